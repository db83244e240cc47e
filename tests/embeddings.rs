//! The embedder against its reference: all-MiniLM-L6-v2 vectors from sentence-transformers
//! (tests/fixtures/make_embeddings.py), and a tiny random BERT against candle-transformers' BERT.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use cited::models::bert::{l2_normalize, mean_pool, Bert, BertConfig, Embedder};
use cited::models::reranker::CrossEncoder;
use cited::models::Batch;
use common::{max_abs_diff, Rng};

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn minilm_matches_sentence_transformers_in_one_mixed_batch() {
    let fx = common::fixture("embeddings_minilm.json");
    let items = fx["items"].as_array().unwrap();
    assert_eq!(items.len(), 20);
    let texts: Vec<&str> = items.iter().map(|i| i["text"].as_str().unwrap()).collect();
    let embedder = Embedder::load(&common::minilm_dir(), &Device::Cpu).unwrap();
    assert_eq!(embedder.max_tokens(), 256);

    let tokens = embedder.tokenize(&texts).unwrap();
    let lengths: Vec<usize> = tokens.iter().map(Vec::len).collect();
    assert!(
        lengths.contains(&256),
        "the long text is truncated to 256: {lengths:?}"
    );
    assert!(
        lengths.iter().any(|&n| n < 10),
        "mixed lengths: {lengths:?}"
    );

    let got = embedder.embed(&texts).unwrap().to_vec2::<f32>().unwrap();
    let mut worst = (1.0f64, "");
    for (item, vec) in items.iter().zip(&got) {
        let want: Vec<f32> = item["vector"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let c = cosine(vec, &want);
        if c < worst.0 {
            worst = (c, item["text"].as_str().unwrap());
        }
    }
    eprintln!(
        "lowest cosine vs sentence-transformers: {:.7} ({:?})",
        worst.0, worst.1
    );
    assert!(worst.0 >= 0.99999, "cosine {} for {:?}", worst.0, worst.1);
}

#[test]
fn minilm_batched_equals_one_by_one_and_vectors_are_unit_length() {
    let texts = [
        "metastatic sarcoma",
        "How is soft tissue sarcoma treated when it has spread to the lungs?",
        "PD-L1 expression",
        "x",
    ];
    let embedder = Embedder::load(&common::minilm_dir(), &Device::Cpu).unwrap();
    let together = embedder.embed(&texts).unwrap();
    for (i, t) in texts.iter().enumerate() {
        let alone = embedder.embed(&[t]).unwrap();
        let d = max_abs_diff(&together.narrow(0, i, 1).unwrap(), &alone);
        assert!(d < 1e-5, "{t}: {d}");
    }
    let norms = together
        .sqr()
        .unwrap()
        .sum(1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-5), "{norms:?}");
    // Related texts are closer than unrelated ones.
    let v = together.to_vec2::<f32>().unwrap();
    assert!(cosine(&v[0], &v[1]) > cosine(&v[0], &v[3]));
    assert_eq!(embedder.embed::<&str>(&[]).unwrap().dims(), &[0, 384]);
}

#[test]
fn embedder_refuses_sequences_it_cannot_run() {
    let embedder = Embedder::load(&common::minilm_dir(), &Device::Cpu).unwrap();
    assert!(embedder.embed_tokens(&[vec![]]).is_err());
    assert!(embedder.embed_tokens(&[vec![101; 257]]).is_err());
}

#[test]
fn packed_bert_matches_candle_transformers_padded_bert() {
    let dir = tempfile::tempdir().unwrap();
    let cfg_json = common::write_tiny_bert(dir.path(), 50, 40, false);
    let dev = Device::Cpu;
    let file = dir.path().join("model.safetensors");
    // SAFETY: test-owned file, not modified while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&file], DType::F32, &dev).unwrap() };
    let cfg: BertConfig = serde_json::from_value(cfg_json.clone()).unwrap();
    let ours = Bert::load(vb.clone(), &cfg).unwrap();
    let oracle_cfg: candle_transformers::models::bert::Config =
        serde_json::from_value(cfg_json).unwrap();
    let oracle = candle_transformers::models::bert::BertModel::load(vb, &oracle_cfg).unwrap();

    let mut rng = Rng::new(7);
    let seqs: Vec<Vec<u32>> = [5usize, 17, 17, 1, 33, 9, 9, 9]
        .iter()
        .map(|&n| rng.tokens(n, 50))
        .collect();
    let batch = Batch::from_sequences(&seqs);
    let got = l2_normalize(&mean_pool(&ours.forward(&batch).unwrap(), &batch).unwrap()).unwrap();

    // The oracle: padded to the longest sequence, masked, then masked mean pooling.
    let longest = seqs.iter().map(Vec::len).max().unwrap();
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for s in &seqs {
        for j in 0..longest {
            ids.push(*s.get(j).unwrap_or(&0));
            mask.push(u32::from(j < s.len()));
        }
    }
    let ids = Tensor::from_vec(ids, (seqs.len(), longest), &dev).unwrap();
    let mask = Tensor::from_vec(mask, (seqs.len(), longest), &dev).unwrap();
    let hidden = oracle
        .forward(&ids, &ids.zeros_like().unwrap(), Some(&mask))
        .unwrap();
    let m = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
    let summed = hidden.broadcast_mul(&m).unwrap().sum(1).unwrap();
    let want = summed.broadcast_div(&m.sum(1).unwrap()).unwrap();
    let want = l2_normalize(&want).unwrap();
    let d = max_abs_diff(&got, &want);
    assert!(d < 1e-5, "{d}");
}

#[test]
fn cross_encoder_matches_candle_transformers_bert_with_its_head() {
    use candle_core::IndexOp;
    let dir = tempfile::tempdir().unwrap();
    let cfg_json = common::write_tiny_bert(dir.path(), 30522, 512, true);
    let ce = CrossEncoder::load(dir.path(), &Device::Cpu).unwrap();
    let q = "How is metastatic sarcoma treated?";
    let long = "doxorubicin ".repeat(700);
    let passages = [
        "Doxorubicin is the usual first-line systemic therapy.",
        "Colonoscopy every ten years from age 45.",
        long.as_str(),
    ];
    let got = ce.score(q, &passages).unwrap();
    assert_eq!(got.len(), 3);
    // [CLS] question [SEP] passage [SEP], segments 0 then 1; a long passage is cut to fit.
    let (ids, types) = ce.encode(q, passages[0]).unwrap();
    assert_eq!((ids[0], *ids.last().unwrap()), (101, 102));
    assert_eq!((types[0], *types.last().unwrap()), (0, 1));
    let sep = ids.iter().position(|&t| t == 102).unwrap();
    assert!(types[..=sep].iter().all(|&t| t == 0) && types[sep + 1..].iter().all(|&t| t == 1));
    assert_eq!(ce.encode(q, &long).unwrap().0.len(), 512);

    // The oracle: candle-transformers' BERT per pair, then the pooler and classifier by hand.
    let file = dir.path().join("model.safetensors");
    // SAFETY: test-owned file, not modified while mapped.
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&[&file], DType::F32, &Device::Cpu).unwrap() };
    let oracle_cfg: candle_transformers::models::bert::Config =
        serde_json::from_value(cfg_json).unwrap();
    let oracle =
        candle_transformers::models::bert::BertModel::load(vb.clone(), &oracle_cfg).unwrap();
    let pw = vb.get((32, 32), "bert.pooler.dense.weight").unwrap();
    let pb = vb.get(32, "bert.pooler.dense.bias").unwrap();
    let cw = vb.get((1, 32), "classifier.weight").unwrap();
    let cb = vb.get(1, "classifier.bias").unwrap();
    for (p, g) in passages.iter().zip(&got) {
        let (ids, types) = ce.encode(q, p).unwrap();
        let t = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let tt = Tensor::new(types.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let h = oracle.forward(&t, &tt, None).unwrap();
        let cls = h.i((0, 0)).unwrap().unsqueeze(1).unwrap();
        let pooled = pw
            .matmul(&cls)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .add(&pb)
            .unwrap()
            .tanh()
            .unwrap();
        let logit = cw
            .matmul(&pooled.unsqueeze(1).unwrap())
            .unwrap()
            .squeeze(1)
            .unwrap()
            .add(&cb)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        assert!((logit - g).abs() < 1e-4, "{logit} {g}");
    }
    // The packed batch scores each pair as it scores alone.
    let alone = ce.score(q, &passages[1..2]).unwrap();
    assert!((alone[0] - got[1]).abs() < 1e-5);
}
