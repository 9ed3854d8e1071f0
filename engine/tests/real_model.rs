//! Checks on the real default model (SmolLM2-135M-Instruct Q4_1); `make test` fetches it.
// `[0..n]`: a list of shard ranges that holds one shard (the whole model)
#![allow(clippy::single_range_in_vec_init)]

#[path = "support/common.rs"]
mod common;

use common::*;
use flotilla_engine::{split_at, split_even, ChatMessage, Model, SamplingParams};

fn open() -> Model {
    Model::open(real_model_path()).unwrap()
}

#[test]
fn capital_of_france_is_paris() {
    let mut model = open();
    let p = pipeline(&mut model, &[0..30]);
    let prompt = model.tokenizer().encode("The capital of France is", true).unwrap();
    let g = p.generate(model.tokenizer(), &prompt, &SamplingParams::greedy(8), |_| {}).unwrap();
    assert!(g.text.starts_with(" Paris."), "got {:?}", g.text);
}

#[test]
fn logits_match_independent_reference() {
    let mut model = open();
    let prompts: Vec<Vec<u32>> =
        ["The capital of France is", "fn add(a: i32, b: i32) -> i32 {", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]
            .iter()
            .map(|t| model.tokenizer().encode(t, true).unwrap())
            .collect();
    let reference = reference_logits(&real_model_path(), &prompts);
    let quantized = pipeline(&mut model, &[0..30]);
    model.set_exact_matmul(true);
    let exact = pipeline(&mut model, &[0..30]);
    for (prompt, r) in prompts.iter().zip(&reference) {
        // The forward pass itself: f32 over the same dequantized weights agrees with float64 to rounding.
        let (diff, rel) = compare(&exact.step(&mut exact.new_cache(), prompt).unwrap(), r);
        eprintln!("exact: prompt of {} tokens: max |diff| {diff:.2e}, {rel:.2e} of the logit range", prompt.len());
        assert!(rel < 1e-4, "exact forward: max |diff| {diff} is {rel:.2e} of the logit range");
        // The serving path quantizes activations to 8 bits before each of the 211 quantized matmuls (as
        // llama.cpp does), which moves logits by a few percent of their range; the top token stays.
        let ours = quantized.step(&mut quantized.new_cache(), prompt).unwrap();
        let (diff, rel) = compare(&ours, r);
        eprintln!("quantized: prompt of {} tokens: max |diff| {diff:.4}, {rel:.4} of the logit range", prompt.len());
        assert!(rel < 0.05, "max |diff| {diff} is {rel:.4} of the logit range");
        let top = |v: Vec<f64>| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        assert_eq!(top(ours.iter().map(|&x| x as f64).collect()), top(r.clone()), "argmax differs");
    }
}

#[test]
fn shard_invariance_1_2_3_5_30_and_uneven() {
    let mut model = open();
    let prompt = model.tokenizer().encode("Once upon a time, in a small village,", true).unwrap();
    let whole = pipeline(&mut model, &split_even(30, 1).unwrap());
    let (ref_toks, ref_logits) = decode(&whole, &prompt, 8);
    drop(whole);
    let mut splits: Vec<_> = [2, 3, 5, 30].iter().map(|&k| split_even(30, k).unwrap()).collect();
    splits.push(split_at(30, &[1, 29]).unwrap());
    splits.push(split_at(30, &[4, 11, 12, 25]).unwrap());
    for ranges in splits {
        let p = pipeline(&mut model, &ranges);
        let (toks, logits) = decode(&p, &prompt, 8);
        assert_eq!(toks, ref_toks, "{} stages", ranges.len());
        assert_bit_identical(logits.last().unwrap(), ref_logits.last().unwrap(), &format!("{ranges:?}"));
        assert_bit_identical(&logits[0], &ref_logits[0], &format!("{ranges:?} prefill"));
    }
}

#[test]
fn batch_and_chunking_invariance() {
    let mut model = open();
    let shard = model.load_shard(0..30).unwrap();
    let t = model.tokenizer();
    let seqs: Vec<Vec<u32>> =
        ["Hello", "The quick brown fox jumps over the lazy dog", "1 2 3 4"].iter().map(|s| t.encode(s, true).unwrap()).collect();
    let alone: Vec<Vec<f32>> = seqs.iter().map(|s| run_chunked(&shard, s, &[s.len()])).collect();
    let mut caches: Vec<_> = seqs.iter().map(|_| shard.new_cache()).collect();
    let mut steps: Vec<_> =
        caches.iter_mut().zip(&seqs).map(|(c, s)| flotilla_engine::SeqStep { cache: c, input: flotilla_engine::StageInput::Tokens(s) }).collect();
    for (i, o) in shard.forward(&mut steps).unwrap().into_iter().enumerate() {
        assert_bit_identical(&o.into_logits().unwrap(), &alone[i], &format!("sequence {i} batched"));
    }
    let long = &seqs[1];
    let n = long.len();
    assert_bit_identical(&run_chunked(&shard, long, &vec![1; n]), &alone[1], "token by token");
    assert_bit_identical(&run_chunked(&shard, long, &[3, n - 3]), &alone[1], "chunked prefill");
}

#[test]
fn tokenizer_round_trips_and_known_ids() {
    let model = open();
    let t = model.tokenizer();
    for text in [
        "Hello world",
        "héllo wörld — ✓ 日本語 🚀 emoji",
        "fn main() {\n    let x: Vec<u8> = vec![1, 2, 3];\n}\n",
        "digits 1234567890 and 3.14159",
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n",
    ] {
        let ids = t.encode(text, true).unwrap();
        assert_eq!(t.decode(&ids, false).unwrap(), text, "{ids:?}");
    }
    // ChatML control tokens are single ids; no BOS is added for this model.
    assert_eq!(t.encode("<|im_start|>", true).unwrap(), vec![1]);
    assert_eq!(t.encode("<|im_end|>", true).unwrap(), vec![2]);
    // No prefix space: "Hello" is one token, not "ĠHello" (the bug of candle's TokenizerFromGguf).
    let hello = t.encode("Hello", true).unwrap();
    assert_eq!(hello.len(), 1);
    assert_eq!(t.token(hello[0]), Some("Hello"));
    assert_eq!(t.token(t.encode(" Hello", true).unwrap()[0]), Some("ĠHello"));
    // smollm splits digits one by one.
    assert_eq!(t.encode("2024", true).unwrap().len(), 4);
    assert!(t.stop_ids().contains(&2));
}

#[test]
fn token_ids_equal_llama_cpp() {
    // Ids from llama.cpp's own tokenizer for this GGUF (llama-server /tokenize, add_special false,
    // parse_special true; llama.cpp from the llama_cpp_python 0.3.36 sdist), recorded 2026-11-27:
    // an independent implementation of the smollm pre-tokenizer and BPE.
    let model = open();
    let t = model.tokenizer();
    let cases: Vec<(&str, Vec<u32>)> = vec![
        ("Hello world", vec![19556, 905]),
        (
            "héllo wörld — ✓ 日本語 🚀 emoji",
            vec![88, 2756, 31394, 267, 29989, 400, 1841, 4636, 246, 237, 17097, 241, 115, 40993, 179, 120, 248, 15107, 244, 218, 649, 33777],
        ),
        (
            "fn main() {\n    let x: Vec<u8> = vec![1, 2, 3];\n}\n",
            vec![
                7853, 1085, 1000, 1662, 472, 1303, 1792, 42, 717, 1159, 44, 101, 40, 46, 446, 37024, 21653, 33, 28, 216, 34, 28, 216, 35, 26695, 198,
                109, 198,
            ],
        ),
        ("digits 1234567890 and 3.14159", vec![37307, 216, 33, 34, 35, 36, 37, 38, 39, 40, 41, 32, 284, 216, 35, 30, 33, 36, 33, 37, 41]),
        (
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n",
            vec![1, 9690, 198, 2683, 359, 5356, 30, 2, 198, 1, 4093, 198, 6004, 2, 198],
        ),
        ("  leading spaces\tand\ttabs\n\n\nnewlines", vec![216, 2899, 5600, 197, 397, 197, 100, 7366, 1116, 198, 2241, 5110]),
        ("The capital of France is", vec![504, 3575, 282, 4649, 314]),
    ];
    for (text, ids) in cases {
        assert_eq!(t.encode(text, false).unwrap(), ids, "{text:?}");
    }
}

#[test]
fn chat_template_renders_chatml() {
    let model = open();
    let text = model.chat_template().render(&[ChatMessage::new("user", "Hi")], true).unwrap();
    assert_eq!(text, "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    let with_system = model.chat_template().render(&[ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hi")], false).unwrap();
    assert_eq!(with_system, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
}

#[test]
fn config_from_metadata() {
    let model = open();
    let c = model.config();
    assert_eq!((c.n_layers, c.n_embd, c.n_head, c.n_head_kv, c.vocab_size), (30, 576, 9, 3, 49152));
    assert_eq!(c.context_length, 8192, "context length comes from metadata, not capped");
    assert!(c.tied_embeddings);
}

/// Many sequences at once (so passes over weight tiles of 1 to 6 activation rows, unpacked and packed
/// tiles, and parallel attention all see several rows), split in three stages, on a 2-thread pool: every sequence's logits at every step equal those
/// of that sequence run alone.
#[test]
fn big_mixed_batches_over_three_stages_equal_each_sequence_alone() {
    let mut model = open();
    let t = model.tokenizer().clone();
    let prompts: Vec<Vec<u32>> = (0..24)
        .map(|i| {
            let text = ["Hello", "The quick brown fox jumps over the lazy dog", "1 2 3 4", "fn main() {}", "What is the capital of France?"][i % 5];
            let mut ids = t.encode(&format!("{text} {i}"), true).unwrap();
            ids.truncate(1 + i % 9);
            ids
        })
        .collect();
    let whole = model.load_shard(0..30).unwrap();
    let stages = [model.load_shard(0..7).unwrap(), model.load_shard(7..19).unwrap(), model.load_shard(19..30).unwrap()];
    let next: Vec<u32> = (0..24).map(|i| 100 + 37 * i as u32).collect();
    let pool = flotilla_engine::pool::Pool::new(2);
    pool.install(|| {
        // alone: prefill, then two decode steps
        let alone: Vec<Vec<Vec<f32>>> = prompts
            .iter()
            .zip(&next)
            .map(|(p, &n)| {
                let mut cache = whole.new_cache();
                let mut out = Vec::new();
                for input in [p.clone(), vec![n], vec![n + 1]] {
                    let mut step = [flotilla_engine::SeqStep { cache: &mut cache, input: flotilla_engine::StageInput::Tokens(&input) }];
                    out.push(whole.forward(&mut step).unwrap().remove(0).into_logits().unwrap());
                }
                out
            })
            .collect();
        // batched through three stages: everyone prefills together, then decodes together
        let mut caches: Vec<Vec<_>> = stages.iter().map(|s| (0..24).map(|_| s.new_cache()).collect()).collect();
        #[allow(clippy::needless_range_loop)] // step is also the token index into each sequence alone
        for step in 0..3 {
            let inputs: Vec<Vec<u32>> = (0..24).map(|i| if step == 0 { prompts[i].clone() } else { vec![next[i] + step as u32 - 1] }).collect();
            let mut hidden: Vec<Vec<f32>> = Vec::new();
            for (si, stage) in stages.iter().enumerate() {
                let mut steps: Vec<_> = caches[si]
                    .iter_mut()
                    .enumerate()
                    .map(|(i, c)| flotilla_engine::SeqStep {
                        cache: c,
                        input: if si == 0 {
                            flotilla_engine::StageInput::Tokens(&inputs[i])
                        } else {
                            flotilla_engine::StageInput::Hidden(&hidden[i])
                        },
                    })
                    .collect();
                let outs = stage.forward(&mut steps).unwrap();
                if si == 2 {
                    for (i, o) in outs.into_iter().enumerate() {
                        assert_bit_identical(&o.into_logits().unwrap(), &alone[i][step], &format!("sequence {i} step {step}"));
                    }
                } else {
                    hidden = outs
                        .into_iter()
                        .map(|o| match o {
                            flotilla_engine::StageOutput::Hidden(h) => h,
                            other => panic!("middle stage gave {other:?}"),
                        })
                        .collect();
                }
            }
        }
    });
}
