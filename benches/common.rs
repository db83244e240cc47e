//! Helpers shared by the benches: the fetched model paths.
#![allow(dead_code)]

use std::path::PathBuf;

pub fn model(rel: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(rel);
    assert!(
        p.exists(),
        "{} is missing: run models/fetch.sh",
        p.display()
    );
    p
}

pub fn minilm() -> PathBuf {
    model("all-minilm-l6-v2")
}

pub fn smollm2() -> PathBuf {
    model("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// A clinical paragraph long enough to cut any prefix of up to a few hundred tokens from.
pub const TEXT: &str =
    "Soft tissue sarcoma that has spread to distant organs is called metastatic. \
Treatment then usually shifts from surgery towards systemic therapy, with doxorubicin-based \
chemotherapy as a common first choice, while patients with only a few metastases may still be \
offered surgery or stereotactic radiation. Care teams weigh the tumour's subtype, earlier \
treatment, organ function and the patient's goals. Questions worth asking include what the aim \
of treatment is, which side effects to expect, and whether a clinical trial is open. Large \
real-world studies, such as one that followed 2,225 patients, describe how survival varies with \
subtype and with the number of organs involved. Lung, liver and bone are the most frequent sites, \
and imaging every few months checks whether the disease responds. Supportive care, including \
pain control and nutrition, runs alongside every line of therapy.";
