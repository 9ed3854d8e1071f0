//! Layering (defaults < file < env < flags), the example files, and validation messages.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use flotilla_config::{load, ConfigError, Count, FileConfig, Overrides, DEFAULT_COOKIE};

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
    let p = dir.path().join("c.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn defaults_alone_are_valid() {
    let cfg = load(None, &env(&[]), &Overrides::default()).unwrap();
    assert_eq!(cfg, FileConfig::default());
    let rt = cfg.validate().unwrap();
    assert_eq!(rt.capacity, 1.0);
    assert_eq!(rt.cluster_listen.to_string(), "127.0.0.1:7400");
}

#[test]
fn every_example_file_loads_and_validates() {
    let single = load(Some(&example("single.toml")), &env(&[]), &Overrides::default()).unwrap().validate().unwrap();
    assert_eq!((single.replicas, single.stages), (Count::Fixed(1), Count::Fixed(1)));
    let local = load(Some(&example("local-3.toml")), &env(&[]), &Overrides::default()).unwrap().validate().unwrap();
    assert_eq!(local.seeds.len(), 3);
    assert_eq!(local.replicas, Count::Auto);
    // docker.toml listens on all interfaces: refused with the default cookie, accepted with FLOTILLA_COOKIE.
    let e = load(Some(&example("docker.toml")), &env(&[]), &Overrides::default()).unwrap().validate().unwrap_err();
    assert!(e.to_string().contains("cluster.cookie"), "{e}");
    let docker =
        load(Some(&example("docker.toml")), &env(&[("FLOTILLA_COOKIE", "s3cret"), ("FLOTILLA__NODE__NAME", "node2")]), &Overrides::default())
            .unwrap()
            .validate()
            .unwrap();
    assert_eq!(docker.cookie, "s3cret");
    assert_eq!(docker.name, "node2");
    assert_eq!(docker.seeds[1], ("node2".to_string(), 7400));
    // Listening on all interfaces, a node is dialled by its name (the compose service name).
    assert_eq!(docker.cluster_addr(), "node2:7400");
    assert_eq!(local.cluster_addr(), "127.0.0.1:7401");
    assert_eq!(local.seed_addrs()[2], "127.0.0.1:7403");
    let adv = load(None, &env(&[("FLOTILLA__CLUSTER__ADVERTISE", "10.1.2.3")]), &Overrides::default()).unwrap().validate().unwrap();
    assert_eq!(adv.cluster_addr(), "10.1.2.3:7400");
    assert!(!adv.fault_injection);
}

#[test]
fn layers_apply_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir, "[node]\nname = \"from-file\"\ncapacity = 3.0\n[http]\nlisten = \"127.0.0.1:9000\"\n");
    // file over defaults
    let cfg = load(Some(&file), &env(&[]), &Overrides::default()).unwrap();
    assert_eq!((cfg.node.name.as_str(), cfg.node.capacity), ("from-file", 3.0));
    // env over file: FLOTILLA__NODE__CAPACITY=2 sets the capacity
    let cfg = load(Some(&file), &env(&[("FLOTILLA__NODE__CAPACITY", "2"), ("FLOTILLA__CLUSTER__SEEDS", "a:1,b:2")]), &Overrides::default()).unwrap();
    assert_eq!(cfg.node.capacity, 2.0);
    assert_eq!(cfg.node.name, "from-file");
    assert_eq!(cfg.cluster.seeds, vec!["a:1".to_string(), "b:2".to_string()]);
    // flags over env
    let flags = Overrides { capacity: Some(5.0), name: Some("from-flag".into()), seeds: Some(vec!["c:3".into()]), ..Default::default() };
    let cfg = load(Some(&file), &env(&[("FLOTILLA__NODE__CAPACITY", "2")]), &flags).unwrap();
    assert_eq!((cfg.node.name.as_str(), cfg.node.capacity), ("from-flag", 5.0));
    assert_eq!(cfg.cluster.seeds, vec!["c:3".to_string()]);
    assert_eq!(cfg.http.listen, "127.0.0.1:9000");
    // parallelism counts from env, as numbers or auto
    let cfg =
        load(None, &env(&[("FLOTILLA__PARALLELISM__STAGES", "3"), ("FLOTILLA__PARALLELISM__REPLICAS", "auto")]), &Overrides::default()).unwrap();
    assert_eq!((cfg.parallelism.stages, cfg.parallelism.replicas), (Count::Fixed(3), Count::Auto));
}

#[test]
fn unknown_keys_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir, "[node]\nnmae = \"typo\"\n");
    let e = load(Some(&file), &env(&[]), &Overrides::default()).unwrap_err();
    assert!(e.to_string().contains("nmae"), "{e}");
    let e = load(None, &env(&[("FLOTILLA__NODE__COLOUR", "red")]), &Overrides::default()).unwrap_err();
    assert!(e.to_string().contains("colour"), "{e}");
    let e = load(Some(Path::new("/no/such/config.toml")), &env(&[]), &Overrides::default()).unwrap_err();
    assert!(matches!(e, ConfigError::Load(_)) && e.to_string().contains("does not exist"), "{e}");
}

#[test]
fn validation_names_the_key() {
    let cases: Vec<(&str, &str, &str)> = vec![
        ("FLOTILLA__NODE__CAPACITY", "0", "node.capacity"),
        ("FLOTILLA__NODE__CAPACITY", "-1", "node.capacity"),
        ("FLOTILLA__NODE__NAME", "bad name!", "node.name"),
        ("FLOTILLA__CLUSTER__LISTEN", "not-an-address", "cluster.listen"),
        ("FLOTILLA__CLUSTER__SEEDS", "host-without-port", "cluster.seeds"),
        ("FLOTILLA__CLUSTER__SEEDS", "h:99999", "cluster.seeds"),
        ("FLOTILLA__CLUSTER__LISTEN", "0.0.0.0:7400", "cluster.cookie"),
        ("FLOTILLA__CLUSTER__HEARTBEAT_MISSES", "0", "cluster.heartbeat_misses"),
        ("FLOTILLA__HTTP__LISTEN", "8080", "http.listen"),
        ("FLOTILLA__HTTP__QUEUE_LIMIT", "0", "http.queue_limit"),
        ("FLOTILLA__PARALLELISM__STAGES", "0", "parallelism.stages"),
        ("FLOTILLA__CLUSTER__ADVERTISE", "host:7400", "cluster.advertise"),
        ("FLOTILLA__NODE__LEAVE_TIMEOUT_MS", "5", "node.leave_timeout_ms"),
    ];
    for (k, v, key) in cases {
        let e = load(None, &env(&[(k, v)]), &Overrides::default()).and_then(|c| c.validate()).unwrap_err();
        assert!(e.to_string().contains(key), "{k}={v}: {e}");
    }
    let e = load(None, &env(&[("FLOTILLA__PARALLELISM__STAGES", "many")]), &Overrides::default()).unwrap_err();
    assert!(e.to_string().contains("auto"), "{e}");
    assert_ne!(DEFAULT_COOKIE, "");
}
