//! Invariance and correctness on tiny synthetic models (no download needed).
// `[0..n]`: a list of shard ranges that holds one shard (the whole model)
#![allow(clippy::single_range_in_vec_init)]

#[path = "support/common.rs"]
mod common;

use candle_core::quantized::GgmlDType;
use common::*;
use flotilla_engine::synthetic::SyntheticSpec;
use flotilla_engine::{split_at, split_even, Model, SamplingParams, SeqStep, StageInput, StageOutput};

const PROMPT: [u32; 7] = [5, 80, 120, 33, 200, 7, 260];

#[test]
fn shard_invariance_across_splits() {
    let m = synthetic(&SyntheticSpec { layers: 5, ..Default::default() });
    let mut model = Model::open(&m.path).unwrap();
    let whole = pipeline(&mut model, &split_even(5, 1).unwrap());
    let (ref_toks, ref_logits) = decode(&whole, &PROMPT, 12);
    let splits = vec![
        split_even(5, 2).unwrap(),
        split_even(5, 3).unwrap(),
        split_even(5, 5).unwrap(),
        split_at(5, &[1]).unwrap(),
        split_at(5, &[4]).unwrap(),
        split_at(5, &[1, 2]).unwrap(),
    ];
    for ranges in splits {
        let p = pipeline(&mut model, &ranges);
        let (toks, logits) = decode(&p, &PROMPT, 12);
        assert_eq!(toks, ref_toks, "tokens for split {ranges:?}");
        for (i, (a, b)) in logits.iter().zip(&ref_logits).enumerate() {
            assert_bit_identical(a, b, &format!("split {ranges:?} step {i}"));
        }
    }
}

#[test]
fn batch_invariance_mixed_lengths_and_positions() {
    let m = synthetic(&SyntheticSpec::default());
    let mut model = Model::open(&m.path).unwrap();
    let shard = model.load_shard(0..4).unwrap();
    let seqs: Vec<Vec<u32>> = vec![vec![10, 20, 30, 40, 50], vec![1, 2, 3, 4, 5, 6, 7, 8, 9], vec![99]];
    let alone: Vec<Vec<f32>> = seqs.iter().map(|s| run_chunked(&shard, s, &[s.len()])).collect();
    // All three in one batch.
    let mut caches: Vec<_> = seqs.iter().map(|_| shard.new_cache()).collect();
    let mut steps: Vec<SeqStep> = caches.iter_mut().zip(&seqs).map(|(c, s)| SeqStep { cache: c, input: StageInput::Tokens(s) }).collect();
    let out = shard.forward(&mut steps).unwrap();
    for (i, o) in out.into_iter().enumerate() {
        assert_bit_identical(&o.into_logits().unwrap(), &alone[i], &format!("sequence {i} batched"));
    }
    // Decode steps batched while the sequences sit at different positions, against each decoded alone.
    let next = [7u32, 8, 9];
    let mut steps: Vec<SeqStep> =
        caches.iter_mut().zip(&next).map(|(c, t)| SeqStep { cache: c, input: StageInput::Tokens(std::slice::from_ref(t)) }).collect();
    let out = shard.forward(&mut steps).unwrap();
    for (i, o) in out.into_iter().enumerate() {
        let mut s = seqs[i].clone();
        s.push(next[i]);
        assert_bit_identical(&o.into_logits().unwrap(), &run_chunked(&shard, &s, &[s.len()]), &format!("sequence {i} decode step"));
    }
}

#[test]
fn token_by_token_prefill_and_chunked_prefill_agree() {
    let m = synthetic(&SyntheticSpec::default());
    let mut model = Model::open(&m.path).unwrap();
    let shard = model.load_shard(0..4).unwrap();
    let toks: Vec<u32> = (0..12).map(|i| (i * 37 % 270) as u32).collect();
    let one_shot = run_chunked(&shard, &toks, &[12]);
    assert_bit_identical(&run_chunked(&shard, &toks, &[1; 12]), &one_shot, "token by token");
    assert_bit_identical(&run_chunked(&shard, &toks, &[3, 2, 7]), &one_shot, "chunked 3+2+7");
    assert_bit_identical(&run_chunked(&shard, &toks, &[11, 1]), &one_shot, "chunked 11+1");
}

#[test]
fn middle_stage_batches_hidden_states_invariantly() {
    let m = synthetic(&SyntheticSpec::default());
    let mut model = Model::open(&m.path).unwrap();
    let first = model.load_shard(0..1).unwrap();
    let middle = model.load_shard(1..3).unwrap();
    let seqs: Vec<Vec<u32>> = vec![vec![3, 4, 5], vec![6, 7, 8, 9, 10, 11]];
    let hidden: Vec<Vec<f32>> = seqs
        .iter()
        .map(|s| {
            let mut c = first.new_cache();
            match first.forward(&mut [SeqStep { cache: &mut c, input: StageInput::Tokens(s) }]).unwrap().pop().unwrap() {
                StageOutput::Hidden(h) => h,
                StageOutput::Logits(_) => panic!("first of three stages returns hidden states"),
            }
        })
        .collect();
    let alone: Vec<StageOutput> = hidden
        .iter()
        .map(|h| {
            let mut c = middle.new_cache();
            middle.forward(&mut [SeqStep { cache: &mut c, input: StageInput::Hidden(h) }]).unwrap().pop().unwrap()
        })
        .collect();
    let mut caches = [middle.new_cache(), middle.new_cache()];
    let [c0, c1] = &mut caches;
    let batched = middle
        .forward(&mut [SeqStep { cache: c0, input: StageInput::Hidden(&hidden[0]) }, SeqStep { cache: c1, input: StageInput::Hidden(&hidden[1]) }])
        .unwrap();
    for (a, b) in batched.iter().zip(&alone) {
        match (a, b) {
            (StageOutput::Hidden(x), StageOutput::Hidden(y)) => assert_eq!(bits(x), bits(y)),
            _ => panic!("middle stage returns hidden states"),
        }
    }
}

#[test]
fn thread_count_does_not_change_logits() {
    let m = synthetic(&SyntheticSpec { n_embd: 128, n_ff: 256, ..Default::default() });
    let mut model = Model::open(&m.path).unwrap();
    let shard = model.load_shard(0..4).unwrap();
    let toks: Vec<u32> = (0..40).map(|i| (i * 13 % 270) as u32).collect();
    let one = flotilla_engine::pool::Pool::new(1).install(|| run_chunked(&shard, &toks, &[40]));
    let three = flotilla_engine::pool::Pool::new(3).install(|| run_chunked(&shard, &toks, &[40]));
    assert_bit_identical(&one, &three, "1 vs 3 threads");
}

/// Pools of 2 and 3 threads with even (learnt) shares, and with fixed uneven ones, as a pool gives a
/// slower core's thread fewer rows, sequences and matmul columns; each with its name for messages.
fn uneven_and_even_pools() -> Vec<(String, std::sync::Arc<flotilla_engine::pool::Pool>)> {
    use flotilla_engine::pool::Pool;
    vec![
        ("2".into(), Pool::new(2)),
        ("3".into(), Pool::new(3)),
        ("2 (shares 0.3 / 0.7)".into(), Pool::with_fixed_shares(&[0.3, 0.7])),
        ("3 (shares 0.5 / 0.2 / 0.3)".into(), Pool::with_fixed_shares(&[0.5, 0.2, 0.3])),
    ]
}

/// Prompts long enough that every thread carries a part of the rows through each layer (whole tiles of 16
/// rows, sequences straddling parts, a last part with a partial tile), first stage and a middle stage,
/// against each sequence alone on one thread.
#[test]
fn rows_split_among_threads_give_the_same_logits() {
    let m = synthetic(&SyntheticSpec { n_embd: 128, n_ff: 256, ..Default::default() });
    let mut model = Model::open(&m.path).unwrap();
    let whole = model.load_shard(0..4).unwrap();
    let (front, back) = (model.load_shard(0..2).unwrap(), model.load_shard(2..4).unwrap());
    let prompts: Vec<Vec<u32>> =
        [37usize, 50, 23].iter().enumerate().map(|(s, &n)| (0..n).map(|i| ((i * 13 + s * 71) % 270) as u32).collect()).collect();
    let alone: Vec<Vec<f32>> = flotilla_engine::pool::Pool::new(1).install(|| prompts.iter().map(|p| run_chunked(&whole, p, &[p.len()])).collect());
    for (threads, pool) in uneven_and_even_pools() {
        pool.install(|| {
            let mut caches: Vec<_> = prompts.iter().map(|_| front.new_cache()).collect();
            let mut steps: Vec<_> = caches.iter_mut().zip(&prompts).map(|(c, p)| SeqStep { cache: c, input: StageInput::Tokens(p) }).collect();
            let hidden: Vec<Vec<f32>> = front
                .forward(&mut steps)
                .unwrap()
                .into_iter()
                .map(|o| match o {
                    StageOutput::Hidden(h) => h,
                    StageOutput::Logits(_) => panic!("a first stage returns hidden states"),
                })
                .collect();
            let mut caches: Vec<_> = prompts.iter().map(|_| back.new_cache()).collect();
            let mut steps: Vec<_> = caches.iter_mut().zip(&hidden).map(|(c, h)| SeqStep { cache: c, input: StageInput::Hidden(h) }).collect();
            let out = back.forward(&mut steps).unwrap();
            for (i, (o, a)) in out.into_iter().zip(&alone).enumerate() {
                assert_bit_identical(&o.into_logits().unwrap(), a, &format!("{threads} threads, two stages, sequence {i}"));
            }
            let mut caches: Vec<_> = prompts.iter().map(|_| whole.new_cache()).collect();
            let mut steps: Vec<_> = caches.iter_mut().zip(&prompts).map(|(c, p)| SeqStep { cache: c, input: StageInput::Tokens(p) }).collect();
            for (i, (o, a)) in whole.forward(&mut steps).unwrap().into_iter().zip(&alone).enumerate() {
                assert_bit_identical(&o.into_logits().unwrap(), a, &format!("{threads} threads, one stage, sequence {i}"));
            }
        });
    }
}

/// Many short sequences, as in batched decode: each thread runs the stage for its own run of sequences
/// (prompts of 1-3 tokens, then one decode step each at different positions), first and middle stages
/// and a whole model, against each sequence alone on one thread.
#[test]
fn sequences_split_among_threads_give_the_same_logits() {
    let m = synthetic(&SyntheticSpec { n_embd: 128, n_ff: 256, ..Default::default() });
    let mut model = Model::open(&m.path).unwrap();
    let whole = model.load_shard(0..4).unwrap();
    let (front, back) = (model.load_shard(0..2).unwrap(), model.load_shard(2..4).unwrap());
    let prompts: Vec<Vec<u32>> = (0..50).map(|s| (0..1 + s % 3).map(|i| ((i * 29 + s * 53) % 270) as u32).collect()).collect();
    let next: Vec<u32> = (0..50).map(|s| (s * 17 % 270) as u32).collect();
    let one = flotilla_engine::pool::Pool::new(1);
    let alone: Vec<(Vec<f32>, Vec<f32>)> = one.install(|| {
        prompts
            .iter()
            .zip(&next)
            .map(|(p, &t)| {
                let mut longer = p.clone();
                longer.push(t);
                (run_chunked(&whole, p, &[p.len()]), run_chunked(&whole, &longer, &[longer.len()]))
            })
            .collect()
    });
    let hidden = |o: StageOutput| match o {
        StageOutput::Hidden(h) => h,
        StageOutput::Logits(_) => panic!("a first stage returns hidden states"),
    };
    for (threads, pool) in uneven_and_even_pools() {
        pool.install(|| {
            // whole model: the prompts, then a decode step of one token each
            let mut caches: Vec<_> = prompts.iter().map(|_| whole.new_cache()).collect();
            let mut steps: Vec<_> = caches.iter_mut().zip(&prompts).map(|(c, p)| SeqStep { cache: c, input: StageInput::Tokens(p) }).collect();
            for (i, (o, a)) in whole.forward(&mut steps).unwrap().into_iter().zip(&alone).enumerate() {
                assert_bit_identical(&o.into_logits().unwrap(), &a.0, &format!("{threads} threads, prompts, sequence {i}"));
            }
            let mut steps: Vec<_> =
                caches.iter_mut().zip(&next).map(|(c, t)| SeqStep { cache: c, input: StageInput::Tokens(std::slice::from_ref(t)) }).collect();
            for (i, (o, a)) in whole.forward(&mut steps).unwrap().into_iter().zip(&alone).enumerate() {
                assert_bit_identical(&o.into_logits().unwrap(), &a.1, &format!("{threads} threads, decode step, sequence {i}"));
            }
            // two stages: hidden states between them
            let mut caches: Vec<_> = prompts.iter().map(|_| front.new_cache()).collect();
            let mut steps: Vec<_> = caches.iter_mut().zip(&prompts).map(|(c, p)| SeqStep { cache: c, input: StageInput::Tokens(p) }).collect();
            let h: Vec<Vec<f32>> = front.forward(&mut steps).unwrap().into_iter().map(hidden).collect();
            let mut caches: Vec<_> = prompts.iter().map(|_| back.new_cache()).collect();
            let mut steps: Vec<_> = caches.iter_mut().zip(&h).map(|(c, h)| SeqStep { cache: c, input: StageInput::Hidden(h) }).collect();
            for (i, (o, a)) in back.forward(&mut steps).unwrap().into_iter().zip(&alone).enumerate() {
                assert_bit_identical(&o.into_logits().unwrap(), &a.0, &format!("{threads} threads, two stages, sequence {i}"));
            }
        });
    }
}

#[test]
fn every_weight_format_runs_invariantly_and_matches_reference() {
    for (dtype, embd) in [
        (GgmlDType::Q4_0, GgmlDType::Q8_0),
        (GgmlDType::Q8_0, GgmlDType::Q8_0),
        (GgmlDType::Q4K, GgmlDType::Q6K),
        (GgmlDType::Q5K, GgmlDType::F16),
        // Q5_0 runs as Q8_0 blocks (held at load), Q5_1 as the Q5 blocks Q5_K is held in too
        (GgmlDType::Q5_0, GgmlDType::Q5_1),
        (GgmlDType::Q6K, GgmlDType::Q4_1),
        (GgmlDType::F32, GgmlDType::F32),
    ] {
        let spec = SyntheticSpec {
            n_embd: 256,
            n_ff: 256,
            n_head: 8,
            n_head_kv: 4,
            layers: 2,
            dtype,
            embd_dtype: embd,
            untied_output: dtype == GgmlDType::Q8_0,
            ..Default::default()
        };
        let m = synthetic(&spec);
        let mut model = Model::open(&m.path).unwrap();
        let whole = pipeline(&mut model, &[0..2]);
        let split = pipeline(&mut model, &[0..1, 1..2]);
        let (t1, l1) = decode(&whole, &PROMPT, 4);
        let (t2, l2) = decode(&split, &PROMPT, 4);
        assert_eq!(t1, t2, "{dtype:?}");
        assert_bit_identical(l1.last().unwrap(), l2.last().unwrap(), &format!("{dtype:?}"));
        let reference = reference_logits(&m.path, &[PROMPT.to_vec()]);
        let (diff, rel) = compare(&l1[0], &reference[0]);
        assert!(rel < 0.02, "{dtype:?}: max |diff| {diff} ({:.4} of the logit range)", rel);
    }
}

#[test]
fn logits_match_independent_reference() {
    let m = synthetic(&SyntheticSpec::default());
    let mut model = Model::open(&m.path).unwrap();
    let p = pipeline(&mut model, &[0..4]);
    let prompts = vec![PROMPT.to_vec(), vec![42], (0..30).map(|i| (i * 7 % 270) as u32).collect::<Vec<u32>>()];
    let reference = reference_logits(&m.path, &prompts);
    model.set_exact_matmul(true);
    let exact = pipeline(&mut model, &[0..4]);
    for (prompt, r) in prompts.iter().zip(&reference) {
        let (diff, rel) = compare(&exact.step(&mut exact.new_cache(), prompt).unwrap(), r);
        assert!(rel < 1e-4, "exact forward: max |diff| {diff} is {rel:.2e} of the logit range");
        let ours = p.step(&mut p.new_cache(), prompt).unwrap();
        let (diff, rel) = compare(&ours, r);
        // 8-bit activation quantization before each quantized matmul: about 1% of the logit spread at most.
        assert!(rel < 0.02, "max |diff| {diff} is {rel:.4} of the logit range");
        let top = |v: &[f64]| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        let ours64: Vec<f64> = ours.iter().map(|&x| x as f64).collect();
        assert_eq!(top(&ours64), top(r), "argmax differs");
    }
}

#[test]
fn seeded_sampling_is_reproducible_and_split_invariant() {
    let m = synthetic(&SyntheticSpec::default());
    let mut model = Model::open(&m.path).unwrap();
    let params = SamplingParams { temperature: 0.9, top_k: 40, top_p: 0.95, seed: 1234, max_tokens: 20, ignore_eos: true, ..Default::default() };
    let a = pipeline(&mut model, &[0..4]).generate(model.tokenizer(), &PROMPT, &params, |_| {}).unwrap();
    let b = pipeline(&mut model, &[0..1, 1..3, 3..4]).generate(model.tokenizer(), &PROMPT, &params, |_| {}).unwrap();
    assert_eq!(a.output_token_ids, b.output_token_ids);
    assert_eq!(a.output_token_ids.len(), 20);
    let c = pipeline(&mut model, &[0..4]).generate(model.tokenizer(), &PROMPT, &SamplingParams { seed: 99, ..params.clone() }, |_| {}).unwrap();
    assert_ne!(a.output_token_ids, c.output_token_ids, "another seed should sample differently");
}

#[test]
fn streamed_text_equals_final_text_and_stops_cut() {
    let m = synthetic(&SyntheticSpec::default());
    let mut model = Model::open(&m.path).unwrap();
    let p = pipeline(&mut model, &[0..4]);
    let params = SamplingParams { temperature: 1.0, seed: 5, max_tokens: 40, ignore_eos: true, ..Default::default() };
    let mut streamed = String::new();
    let g = p.generate(model.tokenizer(), &PROMPT, &params, |s| streamed.push_str(s)).unwrap();
    assert_eq!(streamed, g.text);
    assert_eq!(g.finish_reason, flotilla_engine::FinishReason::Length);
    // Pick a stop string from the middle of that text: the output must end right before it.
    let chars: Vec<char> = g.text.chars().collect();
    if chars.len() >= 6 {
        let stop: String = chars[3..5].iter().collect();
        let expect_end = g.text.find(&stop).unwrap();
        let mut streamed = String::new();
        let g2 = p.generate(model.tokenizer(), &PROMPT, &SamplingParams { stop: vec![stop.clone()], ..params }, |s| streamed.push_str(s)).unwrap();
        assert_eq!(g2.text, g.text[..expect_end]);
        assert_eq!(streamed, g2.text);
        assert_eq!(g2.finish_reason, flotilla_engine::FinishReason::Stop);
    }
}

#[test]
fn tokenizer_round_trips_on_byte_level_vocab() {
    let m = synthetic(&SyntheticSpec::default());
    let model = Model::open(&m.path).unwrap();
    let t = model.tokenizer();
    for text in [
        "the cat sat on the mat",
        "héllo wörld ✓ 日本語 🚀",
        "fn main() { println!(\"{}\", 12 + 345); }",
        "<|im_start|>user\nhi<|im_end|>\n",
        "  spaces\t\ttabs\n\nnewlines  ",
    ] {
        let ids = t.encode(text, true).unwrap();
        assert_eq!(t.decode(&ids, false).unwrap(), text);
    }
    assert_eq!(t.encode("<|im_start|>", false).unwrap(), vec![1]);
    // digits are split one by one (smollm pre-tokenizer) even though "12" is a merge
    assert_eq!(t.encode("12", false).unwrap().len(), 2);
    assert_eq!(t.encode(" the", false).unwrap().len(), 1);
}

#[test]
fn sentencepiece_vocab_round_trips_with_byte_fallback() {
    let m = synthetic(&SyntheticSpec { spm_vocab: true, ..Default::default() });
    let model = Model::open(&m.path).unwrap();
    let t = model.tokenizer();
    let ids = t.encode("the cat sat on the mat", true).unwrap();
    assert_eq!(ids[0], 1, "llama vocabularies start with BOS");
    let pieces: Vec<&str> = ids[1..4].iter().map(|&i| t.token(i).unwrap()).collect();
    assert_eq!(pieces, ["▁the", "▁cat", "▁s"], "merges follow the piece scores");
    assert_eq!(t.decode(&ids, true).unwrap(), "the cat sat on the mat");
    // characters outside the vocabulary fall back to their UTF-8 bytes
    let ids = t.encode("héllo 日本", false).unwrap();
    assert!(ids.iter().any(|&i| t.token(i).unwrap().starts_with("<0x")), "{ids:?}");
    assert_eq!(t.decode(&ids, true).unwrap(), "héllo 日本");
    // the model runs with this vocabulary too
    let mut model = Model::open(&m.path).unwrap();
    let p = pipeline(&mut model, &[0..4]);
    let g = p.generate(model.tokenizer(), &[1, 270, 271], &SamplingParams { ignore_eos: true, ..SamplingParams::greedy(5) }, |_| {}).unwrap();
    assert_eq!(g.output_token_ids.len(), 5);
}
