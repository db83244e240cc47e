//! Small PDFs written byte by byte for the PDF reader's tests: Helvetica text placed where asked,
//! an information dictionary, optionally an encryption dictionary.

/// Writes a PDF of `pages`, each a list of (font size, x, y from the top, text), in
/// Helvetica; `encrypt` adds an encryption dictionary whose password is not empty.
pub fn write_pdf(pages: &[Vec<(f64, f64, f64, &str)>], encrypt: bool) -> Vec<u8> {
    let mut objects: Vec<String> = Vec::new();
    let n = pages.len();
    // 1: catalog, 2: pages, 3: font, then per page: page object, content stream.
    objects.push("<< /Type /Catalog /Pages 2 0 R >>".into());
    let kids: Vec<String> = (0..n).map(|i| format!("{} 0 R", 4 + 2 * i)).collect();
    objects.push(format!(
        "<< /Type /Pages /Kids [{}] /Count {n} >>",
        kids.join(" ")
    ));
    objects.push(
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>".into(),
    );
    for (i, lines) in pages.iter().enumerate() {
        objects.push(format!(
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> /Contents {} 0 R >>",
            5 + 2 * i
        ));
        let mut content = String::new();
        for &(size, x, y, text) in lines {
            let escaped = text
                .replace('\\', "\\\\")
                .replace('(', "\\(")
                .replace(')', "\\)");
            content.push_str(&format!(
                "BT /F1 {size} Tf 1 0 0 1 {x} {} Tm ({escaped}) Tj ET\n",
                792.0 - y
            ));
        }
        objects.push(format!(
            "<< /Length {} >>\nstream\n{content}endstream",
            content.len()
        ));
    }
    let info_id = objects.len() + 1;
    objects.push("<< /Title (Sarcoma care guideline) /ModDate (D:20250314093000Z) >>".into());
    let mut encrypt_ref = String::new();
    if encrypt {
        let id = objects.len() + 1;
        let pad = "00".repeat(32);
        objects.push(format!(
            "<< /Filter /Standard /V 1 /R 2 /Length 40 /P -44 /O <{pad}> /U <{}> >>",
            "ab".repeat(32)
        ));
        encrypt_ref = format!(" /Encrypt {id} 0 R /ID [<0123456789abcdef0123456789abcdef> <0123456789abcdef0123456789abcdef>]");
    }
    let mut out = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    for (i, body) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend_from_slice(format!("{} 0 obj\n{body}\nendobj\n", i + 1).as_bytes());
    }
    let xref = out.len();
    out.extend_from_slice(
        format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes(),
    );
    for o in offsets {
        out.extend_from_slice(format!("{o:010} 00000 n \n").as_bytes());
    }
    out.extend_from_slice(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R /Info {info_id} 0 R{encrypt_ref} >>\nstartxref\n{xref}\n%%EOF\n",
            objects.len() + 1
        )
        .as_bytes(),
    );
    out
}

/// A three-page guideline: a running header and a page footer on every page, a heading in
/// larger type, a table.
pub fn guideline_pages() -> Vec<Vec<(f64, f64, f64, &'static str)>> {
    let header = (
        9.0,
        72.0,
        40.0,
        "Regional Sarcoma Network - Clinical Guideline v3",
    );
    vec![
        vec![
            header,
            (18.0, 72.0, 90.0, "Metastatic soft tissue sarcoma"),
            (
                11.0,
                72.0,
                130.0,
                "Doxorubicin is the usual first-line systemic therapy.",
            ),
            (
                11.0,
                72.0,
                145.0,
                "Surgery alone rarely controls widespread disease.",
            ),
            (9.0, 290.0, 760.0, "Page 1 of 3"),
        ],
        vec![
            header,
            (14.0, 72.0, 90.0, "Oligometastatic disease"),
            (
                11.0,
                72.0,
                130.0,
                "Few lung metastases may be removed by metastasectomy.",
            ),
            (11.0, 72.0, 170.0, "Regimen"),
            (11.0, 250.0, 170.0, "Response rate"),
            (11.0, 72.0, 185.0, "Doxorubicin"),
            (11.0, 250.0, 185.0, "18 percent"),
            (9.0, 290.0, 760.0, "Page 2 of 3"),
        ],
        vec![
            header,
            (14.0, 72.0, 90.0, "Follow-up"),
            (
                11.0,
                72.0,
                130.0,
                "Chest imaging every three months for two years.",
            ),
            (9.0, 290.0, 760.0, "Page 3 of 3"),
        ],
    ]
}
