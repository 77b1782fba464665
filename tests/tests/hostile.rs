//! Hostile names: a process whose comm holds a newline, a comma, a double quote and a
//! byte that is not UTF-8, and whose child has ~1 MiB of equally hostile argv, must not
//! crash the agent or break any output format: every JSON line parses, the CSV is
//! RFC 4180 with one column count throughout, and the table has one line per record.

use mentat_tests::truth::Hostile;
use mentat_tests::{RawRecording, record, record_raw, workload_command};

/// Runs `workload hostile` under `record --format FORMAT`; the agent must exit with the
/// command's code, 0.
fn record_hostile(format: &str) -> RawRecording {
    let command = workload_command(&["hostile"]).expect("the workload binary");
    let recording = record_raw(format, &[], Some(&command))
        .unwrap_or_else(|e| panic!("recording `workload hostile` as {format}: {e:#}"));
    assert_eq!(
        recording.output.exit_code,
        Some(0),
        "{}: the agent must survive hostile names and exit with the command's code 0; {}",
        recording.invocation,
        recording.output.describe()
    );
    recording
}

/// The ground truth on the agent's stdout (the command's output passes through).
fn truth_of(recording: &RawRecording) -> Hostile {
    let line = recording
        .output
        .stdout
        .lines()
        .rev()
        .find(|line| line.starts_with('{'))
        .unwrap_or_else(|| panic!("no ground truth on the stdout of {}", recording.invocation));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("ground truth {line:?}: {e}"))
}

/// The kernel holds the comm as raw bytes; any faithful rendering (lossy UTF-8, escaped)
/// keeps the printable parts around the newline.
fn looks_like_the_hostile_comm(comm: &str) -> bool {
    comm.contains("ev") && comm.contains("il")
}

#[test]
fn jsonl_stays_one_valid_record_per_line() {
    // `record` parses every line strictly (see records.rs); a raw newline or quote in
    // a name would break a line or the JSON inside it.
    let recording = record(&[], Some(&["hostile"])).expect("recording `workload hostile` as jsonl");
    recording
        .output
        .ensure_success(&recording.invocation)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let truth: Hostile = recording.ground_truth().expect("hostile's ground truth");
    let child = recording
        .records
        .expect_pid(truth.child_pid, "the hostile child (~1 MiB of argv)");
    for record in &child {
        assert!(
            looks_like_the_hostile_comm(&record.comm),
            "the hostile child's comm is {:?}; the kernel's is {:?}",
            record.comm,
            String::from_utf8_lossy(mentat_tests::truth::HOSTILE_COMM)
        );
    }
}

#[test]
fn csv_is_rfc_4180_with_a_constant_column_count() {
    let recording = record_hostile("csv");
    let truth = truth_of(&recording);
    let rows = parse_csv(&recording.text)
        .unwrap_or_else(|e| panic!("the CSV is not RFC 4180: {e}\n{}", recording.text));
    let (header, data) = rows.split_first().expect("a CSV with no header row");
    assert!(!data.is_empty(), "a CSV with no data rows");
    for (index, row) in data.iter().enumerate() {
        assert_eq!(
            row.len(),
            header.len(),
            "CSV row {} has {} fields, the header {}: {row:?}",
            index + 2,
            row.len(),
            header.len()
        );
    }
    let column = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("no {name:?} column in the CSV header {header:?}"))
    };
    let (pid, comm) = (column("pid"), column("comm"));
    let child: Vec<_> = data
        .iter()
        .filter(|row| row[pid] == truth.child_pid.to_string())
        .collect();
    assert!(
        !child.is_empty(),
        "no CSV row of the hostile child (pid {})",
        truth.child_pid
    );
    for row in child {
        assert!(
            looks_like_the_hostile_comm(&row[comm]),
            "the hostile child's comm in the CSV is {:?}",
            row[comm]
        );
    }
}

#[test]
fn the_table_has_one_line_per_process() {
    let recording = record_hostile("table");
    let truth = truth_of(&recording);
    let lines: Vec<&str> = recording.text.lines().collect();
    let header = lines
        .iter()
        .position(|line| line.split_whitespace().next() == Some("PID"))
        .unwrap_or_else(|| panic!("no PID header in the table:\n{}", recording.text));
    let total = lines
        .iter()
        .position(|line| line.split_whitespace().next() == Some("TOTAL"))
        .unwrap_or_else(|| panic!("no TOTAL line in the table:\n{}", recording.text));
    // "TOTAL   N processes ...": the table's own count of its rows.
    let counted: usize = lines[total]
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no process count on the TOTAL line {:?}", lines[total]));
    let rows = &lines[header + 1..total];
    assert_eq!(
        rows.len(),
        counted,
        "the table prints {counted} processes on {} lines: a name broke a row:\n{}",
        rows.len(),
        recording.text
    );
    for row in rows {
        assert!(
            row.split_whitespace()
                .next()
                .is_some_and(|pid| pid.parse::<u32>().is_ok()),
            "a table row that does not start with a pid: {row:?}\n{}",
            recording.text
        );
    }
    for pid in [truth.parent_pid, truth.child_pid] {
        let of_pid: Vec<_> = rows
            .iter()
            .filter(|row| row.split_whitespace().next() == Some(pid.to_string().as_str()))
            .collect();
        assert!(
            !of_pid.is_empty() && of_pid.iter().all(|row| looks_like_the_hostile_comm(row)),
            "the table's rows of pid {pid} (hostile comm) are {of_pid:?}"
        );
    }
}

/// Parses RFC 4180 CSV (LF or CRLF line breaks): a field is either bare (no quote,
/// comma or line break in it) or quoted (any text, quotes doubled). Errors name the
/// line and say what is wrong.
fn parse_csv(text: &str) -> Result<Vec<Vec<String>>, String> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    // Whether the current field was quoted, and whether its quotes are still open.
    let (mut quoted, mut open) = (false, false);
    let mut line = 1;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if open {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => open = false,
                c => {
                    if c == '\n' {
                        line += 1;
                    }
                    field.push(c);
                }
            }
            continue;
        }
        match c {
            '"' if field.is_empty() && !quoted => (quoted, open) = (true, true),
            '"' => return Err(format!("line {line}: a quote inside a field")),
            ',' => {
                row.push(std::mem::take(&mut field));
                quoted = false;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
                quoted = false;
                line += 1;
            }
            _ if quoted => return Err(format!("line {line}: text after a closing quote")),
            '\r' => return Err(format!("line {line}: a bare CR outside quotes")),
            c => field.push(c),
        }
    }
    if open {
        return Err(format!("line {line}: a quoted field is never closed"));
    }
    if quoted || !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    Ok(rows)
}

#[test]
fn the_csv_parser_is_strict() {
    let ok = parse_csv("a,b\r\n\"x,\"\"y\"\"\nz\",\n").expect("valid CSV");
    assert_eq!(
        ok,
        vec![
            vec!["a".to_owned(), "b".to_owned()],
            vec!["x,\"y\"\nz".to_owned(), String::new()]
        ]
    );
    for bad in ["a\"b,c\n", "\"a\"b,c\n", "\"open,c\n", "a\rb\n"] {
        assert!(parse_csv(bad).is_err(), "{bad:?} accepted");
    }
}
