//! Similarity search: parity of every kernel variant (seeded or not) against the CPU top-k,
//! and the variant sweep over the benchmark shapes.

use super::*;

/// One similarity parity case on every variant that takes its k.
pub(crate) fn similarity_case(
    dev: &Device,
    rng: &mut Rng,
    (nq, n, d, k): (usize, usize, usize, usize),
    rows_per_part: Option<u32>,
    distinct: Option<usize>,
) -> Result<bool> {
    let q = rng.halves(nq * d);
    // With `distinct`, the corpus repeats that many random rows: every score occurs many times,
    // so ties decide the k-th place (by lower id) and can sit exactly at a seeded threshold.
    let c = match distinct {
        Some(m) => {
            let block = rng.halves(m * d);
            (0..n)
                .flat_map(|r| block[(r % m) * d..(r % m + 1) * d].iter().copied())
                .collect()
        }
        None => rng.halves(n * d),
    };
    let want = topk_cpu(&to_f32(&q), &c, d, k)?;
    let qt = Tensor::from_vec(q, (nq, d), dev)?;
    let ct = Tensor::from_vec(c, (n, d), dev)?;
    // f32 sums of d products of values near 1: rounding differs by order, well under 1e-3.
    let tol = 2e-3 * (d as f32 / 384.0).sqrt().max(1.0);
    let mut all_ok = true;
    let seedable = (k..n).contains(&default_seed_rows(n, k));
    let ties = distinct.map_or(String::new(), |m| format!(" ({m} distinct rows)"));
    // Runs one search (poisoned first) and prints its verdict line; `detail` names its part
    // size or chunk.
    let mut check = |name: String, run: &dyn Fn() -> Result<(String, Vec<Vec<Hit>>)>| {
        let (detail, verdict) = match run() {
            Ok((detail, got)) => (detail, judge(&got, &want, n, tol)),
            Err(e) => ("?".to_string(), Err(format!("error {e}"))),
        };
        all_ok &= verdict.is_ok();
        println!(
            "PARITY\tsimilarity\t{name}\tnq={nq} n={n} d={d} k={k} {detail}{ties}\t{}",
            match &verdict {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("FAIL {e}"),
            }
        );
    };
    let plus = |seed: bool| if seed { "+seed" } else { "" };
    for v in VARIANTS
        .iter()
        .filter(|v| k as u32 <= v.max_k && d as u32 <= v.max_d)
    {
        // Unseeded, then seeded where the corpus has room for a prefix.
        for seed in [false, true].into_iter().filter(|&s| !s || seedable) {
            check(format!("{}{}", v.name, plus(seed)), &|| {
                let mut s = Search::new(&qt, &ct, k, Some(v), rows_per_part)?;
                if seed {
                    s = s.with_seed(None)?;
                }
                s.poison()?;
                s.launch()?;
                Ok((format!("rows_per_part={}", s.rows_per_part()), s.read()?))
            });
        }
    }
    // The cuBLAS products with the filter kernel: the default chunk, then chunks of about a
    // third of the corpus (several chunks, the last one shorter); unseeded and seeded.
    for chunk in [None, Some((n / 3 + 1) as u32)] {
        for seed in [false, true].into_iter().filter(|&s| !s || seedable) {
            check(format!("gemm{}", plus(seed)), &|| {
                let mut s = GemmSearch::new(&qt, &ct, k, chunk)?;
                if seed {
                    s = s.with_seed(None)?;
                }
                s.poison()?;
                s.launch()?;
                Ok((format!("chunk_rows={}", s.chunk_rows()), s.read()?))
            });
        }
    }
    Ok(all_ok)
}

/// A search's hits against the reference's: no id past the corpus (a seed entry, id
/// 0xFFFFFFFF, or padding must never reach the results), then [`compare_hits`].
fn judge(
    got: &[Vec<Hit>],
    want: &[Vec<Hit>],
    n: usize,
    tol: f32,
) -> std::result::Result<(), String> {
    match got.iter().flatten().find(|h| h.id as usize >= n) {
        Some(h) => Err(format!("id {} past the corpus", h.id)),
        None => compare_hits(got, want, tol),
    }
}

/// The similarity cases of `cases` (nq, n, d, k), then a corpus of two repeated rows (ties at
/// the seed), and with `more` further fixed cases: many small parts, and 50 repeated rows.
pub(crate) fn similarity_parity(
    dev: &Device,
    cases: &[(usize, usize, usize, usize)],
    more: bool,
) -> Result<bool> {
    let mut rng = Rng(SplitMix64::new(20261127));
    let mut ok = true;
    for &case in cases {
        ok &= similarity_case(dev, &mut rng, case, None, None)?;
    }
    // Ties. Two rows repeated 1,500 times: the seed prefix (1,024 rows) has the same k-th best
    // score as the whole corpus, so rows scoring exactly the seed must still get in, lowest
    // ids first.
    ok &= similarity_case(dev, &mut rng, (3, 3_000, 64, 64), None, Some(2))?;
    if more {
        // Many small parts: the merge sees parts * k candidates far beyond shared memory.
        ok &= similarity_case(dev, &mut rng, (5, 40_000, 64, 100), Some(37), None)?;
        ok &= similarity_case(dev, &mut rng, (2, 9_999, 384, 256), Some(100), None)?;
        // 50 rows repeated 60 times.
        ok &= similarity_case(dev, &mut rng, (33, 3_000, 128, 10), None, Some(50))?;
    }
    Ok(ok)
}

/// Median milliseconds of the search, timed with CUDA events.
pub(crate) fn time_search(s: &mut Search) -> Result<f64> {
    let stream = s.stream();
    time_launches(&stream, 0.8, || Ok(s.launch()?))
}

/// Whether a variant is worth timing at `nq` queries (one query a block only for small
/// batches, tensor-core tiles only from 8 queries).
pub(crate) fn suits(v: &Variant, nq: usize) -> bool {
    match v.queries_per_block {
        1 => nq <= 32,
        q if q <= 16 => nq <= 256,
        _ => nq >= 8,
    }
}

/// Every variant that suits each shape, at its default part size (and half and twice it on
/// the big corpus, and seeded), with the fraction of HBM bandwidth the corpus read reaches.
pub(crate) fn sweep(
    dev: &Device,
    ns: &[usize],
    nqs: &[usize],
    ks: &[usize],
    d: usize,
    peak_tbs: f64,
) -> Result<()> {
    for &n in ns {
        // Generated on the device: a 10^7 x 384 corpus is 7.7 GB in f16.
        let corpus = Tensor::randn(0f32, 1.0, (n, d), dev)?.to_dtype(DType::F16)?;
        let bytes = (n * d * 2) as f64;
        for &nq in nqs {
            let queries = Tensor::randn(0f32, 1.0, (nq, d), dev)?.to_dtype(DType::F16)?;
            for &k in ks {
                // One SWEEP line per timed setting: its time and bandwidth, or its error.
                let report = |name: &str, setting: String, timed: Result<f64>| match timed {
                    Ok(ms) => {
                        let tbs = bytes / (ms / 1e3) / 1e12;
                        println!(
                            "SWEEP\tn={n}\tnq={nq}\tk={k}\t{name}\t{setting}\t{ms:.3} ms\t{tbs:.2} TB/s\t{:.0}% of {peak_tbs} TB/s",
                            100.0 * tbs / peak_tbs
                        );
                    }
                    Err(e) => println!("SWEEP\tn={n}\tnq={nq}\tk={k}\t{name}\tERROR {e}"),
                };
                for v in VARIANTS
                    .iter()
                    .filter(|v| k as u32 <= v.max_k && d as u32 <= v.max_d && suits(v, nq))
                {
                    let mut base = match Search::new(&queries, &corpus, k, Some(v), None) {
                        Ok(b) => b,
                        Err(e) => {
                            println!("SWEEP\tn={n}\tnq={nq}\tk={k}\t{}\tERROR {e}", v.name);
                            continue;
                        }
                    };
                    let rpp = base.rows_per_part();
                    // The part size is swept on the big corpus only.
                    let options: &[(&str, u32)] = if n >= 5_000_000 {
                        &[("1x", rpp), ("half", (rpp / 2).max(256)), ("2x", rpp * 2)]
                    } else {
                        &[("1x", rpp)]
                    };
                    // The default part size is also timed with seeded thresholds.
                    let runs = options
                        .iter()
                        .map(|&(label, rows)| (label, rows, false))
                        .chain(std::iter::once(("1x", rpp, true)));
                    for (label, rows, seeded) in runs {
                        let name = format!("{}{}", v.name, if seeded { "+seed" } else { "" });
                        let timed = if label == "1x" && !seeded {
                            time_search(&mut base)
                        } else {
                            Search::new(&queries, &corpus, k, Some(v), Some(rows))
                                .and_then(|s| if seeded { s.with_seed(None) } else { Ok(s) })
                                .map_err(anyhow::Error::from)
                                .and_then(|mut s| time_search(&mut s))
                        };
                        report(&name, format!("rows_per_part={rows} ({label})"), timed);
                    }
                }
                // cuBLAS products + the filter kernel, for batches: the default chunk, half and
                // twice it, and the default seeded.
                if nq >= 16 {
                    let base = GemmSearch::new(&queries, &corpus, k, None)?.chunk_rows();
                    for (label, chunk, seeded) in [
                        ("1x", base, false),
                        ("half", (base / 2).max(1024), false),
                        ("2x", base.saturating_mul(2), false),
                        ("1x", base, true),
                    ] {
                        let name = if seeded { "gemm+seed" } else { "gemm" };
                        let timed = GemmSearch::new(&queries, &corpus, k, Some(chunk))
                            .and_then(|s| if seeded { s.with_seed(None) } else { Ok(s) })
                            .map_err(anyhow::Error::from)
                            .and_then(|mut s| {
                                let stream = s.stream();
                                time_launches(&stream, 0.8, || Ok(s.launch()?))
                            });
                        report(name, format!("chunk_rows={chunk} ({label})"), timed);
                    }
                }
            }
        }
        drop(corpus);
    }
    Ok(())
}
