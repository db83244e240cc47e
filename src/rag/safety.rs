//! Questions the server must not answer from the corpus, decided before anything is generated:
//! signs of an emergency, a request for a personal dose, a request to be diagnosed, and questions
//! that are not about cancer or its care. Each gets a fixed reply written here, never model text.
//!
//! The rules are lexical and deliberately cautious: an emergency or a personal request needs a
//! person in the question (`I`, `my`, `my husband`, ...), so general questions ("what dose of
//! doxorubicin is usual?") still get a cited answer.

/// Why a question gets a fixed reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Triage {
    /// Signs of an emergency: emergency services first.
    Emergency,
    /// A dose or schedule for this person: their care team.
    PersonalDose,
    /// Whether this person has cancer, or what their own results or outlook are: their care team.
    Diagnosis,
}

impl Triage {
    /// The fixed reply.
    pub fn reply(self) -> &'static str {
        match self {
            Self::Emergency => EMERGENCY,
            Self::PersonalDose => PERSONAL_DOSE,
            Self::Diagnosis => DIAGNOSIS,
        }
    }

    /// The `finish_reason` of an answer that got this reply.
    pub fn finish_reason(self) -> &'static str {
        match self {
            Self::Emergency => "emergency",
            Self::PersonalDose | Self::Diagnosis => "referred",
        }
    }
}

pub const EMERGENCY: &str = "What you describe can be a medical emergency. Call your local \
emergency number (for example 911 in the US, 112 in Europe, 999 in the UK) or go to the nearest \
emergency department now. If you are having cancer treatment, also call your care team's \
24-hour line. This service cannot assess an emergency.";

pub const PERSONAL_DOSE: &str = "A dose or schedule for you can only come from your care team, \
who know your weight, blood counts, kidney and liver function and your other medicines. Please \
ask your oncologist, nurse or pharmacist before changing how you take any medicine; if you missed \
or doubled a dose, call them or your treatment centre's advice line today.";

pub const DIAGNOSIS: &str = "Only your care team can tell whether you have cancer, or what your \
own results and outlook mean, after examining you and reviewing your tests. Please see your doctor \
about it; if a symptom is getting worse quickly, seek care promptly.";

/// Said when a question is not about cancer or its care.
pub const OFF_TOPIC: &str = "This service answers questions about cancer and its care from its \
library of clinical sources; that question is outside what it covers.";

/// Someone asking about themselves or a person close to them.
const PERSONAL: &[&str] = &[
    " i ",
    " i'm ",
    " im ",
    " i've ",
    " i’m ",
    " my ",
    " me ",
    " myself ",
    " mine ",
    " husband",
    " wife ",
    " partner ",
    " mom ",
    " mum ",
    " mother ",
    " dad ",
    " father ",
    " son ",
    " daughter",
    " child ",
    " he is ",
    " she is ",
    " he's ",
    " she's ",
    " he has ",
    " she has ",
    " right now",
];

/// Signs that need emergency care now.
const EMERGENCY_SIGNS: &[&str] = &[
    "can't breathe",
    "cannot breathe",
    "can’t breathe",
    "trouble breathing",
    "struggling to breathe",
    "hard to breathe",
    "short of breath",
    "shortness of breath",
    "chest pain",
    "chest hurts",
    "coughing up blood",
    "vomiting blood",
    "throwing up blood",
    "bleeding heavily",
    "heavy bleeding",
    "won't stop bleeding",
    "will not stop bleeding",
    "fever",
    "temperature of 38",
    "temperature of 39",
    "100.4",
    "seizure",
    "fainted",
    "passed out",
    "unconscious",
    "confused",
    "confusion",
    "suicid",
    "kill myself",
    "end my life",
    "ending my life",
    "don't see the point",
    "no point in living",
    "coughing up",
    "vomiting blood",
    "bloody",
    "black stools",
    "faint",
    "drowsy",
    "seeing things",
    "hallucinat",
    "numb",
    "self-harm",
    "hurt myself",
    "harm myself",
    "can't feel my legs",
    "legs are weak",
    "weakness in my legs",
    "weak legs",
    "numb legs",
    "numbness in my legs",
    "can't walk",
    "cannot walk",
    "stroke",
    "severe pain",
    "unbearable pain",
    "face is drooping",
];

/// A dose, an amount or a schedule.
const DOSE_WORDS: &[&str] = &[
    "dose",
    "dosage",
    "mg",
    "milligram",
    "how much",
    "how many",
    "pills",
    "tablets",
    "double",
    "skip",
    "how often",
    " every ",
    "instead of",
    "stop taking",
    "take more",
    "take less",
];

/// Asking what to do oneself.
const ASKS_FOR_SELF: &[&str] = &[
    "should i",
    "can i",
    "do i",
    "shall i",
    "may i",
    "for me",
    "my dose",
    "i take",
    "i'm taking",
    "i am taking",
    "should my",
    "should he",
    "should she",
    "i missed",
];

/// Asking to be diagnosed or for a personal outlook.
const DIAGNOSIS_ASKS: &[&str] = &[
    "do i have",
    "does he have",
    "does she have",
    "mean i have",
    "means i have",
    "is it cancer",
    "is this cancer",
    "is that cancer",
    "could it be",
    "could this be",
    "could that be",
    "is it a sarcoma",
    "is it sarcoma",
    "is it malignant",
    "is this malignant",
    "am i going to die",
    "will i die",
    "how long do i have",
    "how long will i live",
    "how long does he have",
    "how long does she have",
    "my chances",
    "my prognosis",
    "should i worry",
    "should i be worried",
    "am i at risk",
    "is my ",
    "have i got",
    "come back",
    "am i going to get",
    "will i get",
    " is it ",
    " is this ",
];

/// Symptoms, findings and results: what a request to be diagnosed is about.
const FINDINGS: &[&str] = &[
    "lump", "mole", "spot", "mass", "swelling", "pain", "bleeding", "blood", "scan", "test",
    "result", "biopsy", "psa", "symptom", "cough", "rash", "tumour", "tumor", "cancer", "node",
];

/// Words of cancer and its care: a question with none of them, and no passage clearing the
/// evidence bounds, is off topic.
const CANCER_CARE: &[&str] = &[
    "cancer",
    "tumor",
    "tumour",
    "oncolog",
    "chemo",
    "radiation",
    "radiother",
    "biopsy",
    "metasta",
    "malignan",
    "benign",
    "carcinoma",
    "sarcoma",
    "lymphoma",
    "leukemia",
    "leukaemia",
    "melanoma",
    "myeloma",
    "blastoma",
    "glioma",
    "mesothelioma",
    "neoplasm",
    "screening",
    "mammogra",
    "psa",
    "colonoscop",
    "immunother",
    "targeted therap",
    "hormone therap",
    "surgery",
    "mastectomy",
    "lumpectomy",
    "remission",
    "relapse",
    "recurren",
    "palliative",
    "hospice",
    "clinical trial",
    "lump",
    "polyp",
    "nodule",
    "mutation",
    "brca",
    "her2",
    "egfr",
    "marrow",
    "stem cell",
    "prognosis",
    "survival",
    "staging",
    "stage ",
    "gist",
    "side effect",
    "nausea",
    "oncologist",
    "radiologist",
    "pathology",
];

/// Lower case with spaces around, punctuation spaced out, so word lists match at the edges.
fn normalise(question: &str) -> String {
    let mut s = String::with_capacity(question.len() + 2);
    s.push(' ');
    for c in question.to_lowercase().chars() {
        if matches!(c, '?' | '!' | ',' | ';' | ':' | '(' | ')' | '"') {
            s.push(' ');
        } else if c == '.' {
            s.push_str(" . ");
        } else {
            s.push(c);
        }
    }
    s.push(' ');
    s
}

fn any(text: &str, words: &[&str]) -> bool {
    words.iter().any(|w| text.contains(w))
}

/// The fixed reply a question needs, if any (checked in order: emergency, dose, diagnosis).
pub fn triage(question: &str) -> Option<Triage> {
    let q = normalise(question);
    let personal = any(&q, PERSONAL);
    if personal && any(&q, EMERGENCY_SIGNS) {
        return Some(Triage::Emergency);
    }
    if any(&q, DOSE_WORDS) && any(&q, ASKS_FOR_SELF) {
        return Some(Triage::PersonalDose);
    }
    if personal && any(&q, DIAGNOSIS_ASKS) && (about_cancer_care(question) || any(&q, FINDINGS)) {
        return Some(Triage::Diagnosis);
    }
    None
}

/// Whether a question speaks of cancer or its care at all.
pub fn about_cancer_care(question: &str) -> bool {
    let q = normalise(question);
    if any(&q, CANCER_CARE) {
        return true;
    }
    // Tumour names: `...oma` words (not `diploma`, `aroma`, `coma`).
    q.split_whitespace().any(|w| {
        w.len() > 5 && w.ends_with("oma") && !["diploma", "aroma"].contains(&w)
            || w.ends_with("omas")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emergencies_need_a_person_and_a_sign() {
        for q in [
            "I have a fever of 38.5 after chemo yesterday, what should I do?",
            "My husband is confused and very sleepy since his treatment",
            "I can't breathe properly and my chest hurts",
            "I have been thinking about ending things, I want to kill myself",
            "My back hurts and my legs are weak, I have prostate cancer",
        ] {
            assert_eq!(triage(q), Some(Triage::Emergency), "{q}");
        }
        // General questions about the same signs are answered from the sources.
        assert_eq!(
            triage("What is febrile neutropenia during chemotherapy?"),
            None
        );
        assert_eq!(triage("Why does fever matter during chemotherapy?"), None);
        // Not about a body: no diagnosis to refer.
        assert_eq!(triage("My car makes a noise, what could it be?"), None);
    }

    #[test]
    fn personal_doses_and_diagnoses_are_referred() {
        for q in [
            "How many milligrams of doxorubicin should I take?",
            "Can I double my capecitabine dose since I missed one?",
            "What dose of imatinib is right for me?",
        ] {
            assert_eq!(triage(q), Some(Triage::PersonalDose), "{q}");
        }
        for q in [
            "I have a lump in my thigh, is it sarcoma?",
            "Do I have cancer if my PSA is 6?",
            "How long do I have with stage 4 sarcoma?",
        ] {
            assert_eq!(triage(q), Some(Triage::Diagnosis), "{q}");
        }
        for q in [
            "What dose of doxorubicin is used in soft tissue sarcoma?",
            "How is metastatic sarcoma different from other stages?",
            "Which tests diagnose a soft tissue sarcoma?",
        ] {
            assert_eq!(triage(q), None, "{q}");
        }
    }

    #[test]
    fn topic_words() {
        assert!(about_cancer_care("What is a liposarcoma?"));
        assert!(about_cancer_care("Does PSA screening help?"));
        assert!(about_cancer_care(
            "What are the options for retinoblastoma?"
        ));
        assert!(!about_cancer_care("How do I change a flat tyre?"));
        assert!(!about_cancer_care("Best aroma for a diploma party?"));
    }
}
