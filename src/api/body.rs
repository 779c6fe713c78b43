//! Request bodies: the size limit, and parsing of events (JSON or NDJSON), control objects and
//! member CSV.
//!
//! The limit is checked twice: a `Content-Length` above it is refused from the headers alone,
//! before the body is polled (so a client waiting on `Expect: 100-continue` never gets its
//! `100 Continue` and need not send the body); a body without a length (chunked) is read through
//! [`http_body_util::Limited`] and refused as soon as it passes the limit.

use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::HeaderMap;
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE};
use serde::de::{DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde_json::Value;

use super::ApiError;

/// The largest id in a path, in bytes.
pub const MAX_ID_LEN: usize = 128;

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// `Err(PayloadTooLarge)` when the headers announce a body larger than `limit`; reads nothing.
pub(crate) fn check_content_length(headers: &HeaderMap, limit: u64) -> Result<(), ApiError> {
    let Some(value) = headers.get(CONTENT_LENGTH) else {
        return Ok(());
    };
    let length: u64 = value
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| ApiError::bad_request("invalid Content-Length"))?;
    if length > limit {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    Ok(())
}

/// The whole body, at most `limit` bytes. Call [`check_content_length`] first.
pub(crate) async fn read_body(body: Incoming, limit: u64) -> Result<Bytes, ApiError> {
    let max = usize::try_from(limit).unwrap_or(usize::MAX);
    match Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(ApiError::PayloadTooLarge { limit }),
        Err(_) => Err(ApiError::bad_request("could not read the request body")),
    }
}

/// The media type of `Content-Type` without parameters, lowercased; `None` when absent.
pub(crate) fn media_type(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(CONTENT_TYPE) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::UnsupportedMediaType("(not ASCII)".into()))?;
    let essence = text
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    Ok(Some(essence))
}

/// How an events body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventsFormat {
    /// One object or an array of objects.
    Json,
    /// One object per non-empty line.
    Ndjson,
}

impl EventsFormat {
    /// From the media type: JSON when absent; 415 for anything but JSON or NDJSON.
    pub(crate) fn of(media_type: Option<&str>) -> Result<Self, ApiError> {
        match media_type {
            None | Some("application/json") => Ok(EventsFormat::Json),
            Some("application/x-ndjson" | "application/ndjson" | "application/jsonl") => {
                Ok(EventsFormat::Ndjson)
            }
            Some(other) => Err(ApiError::UnsupportedMediaType(other.to_string())),
        }
    }
}

/// The events of a body: a JSON object, a JSON array of objects, or NDJSON. The error names the
/// 0-based index of the first bad event; for an empty body or one that is not UTF-8 (JSON), no
/// index.
pub(crate) fn parse_events(body: &[u8], format: EventsFormat) -> Result<Vec<Value>, ApiError> {
    let body = body.strip_prefix(BOM).unwrap_or(body);
    match format {
        EventsFormat::Json => parse_json_events(body),
        EventsFormat::Ndjson => parse_ndjson_events(body),
    }
}

fn parse_json_events(body: &[u8]) -> Result<Vec<Value>, ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::bad_request(format!(
            "request body is not UTF-8 (at byte {})",
            e.valid_up_to()
        ))
    })?;
    let trimmed = text.trim_start();
    if trimmed.is_empty() {
        return Err(ApiError::bad_request("empty request body: no events"));
    }
    if trimmed.starts_with('[') {
        let mut parsed = 0usize;
        let mut de = serde_json::Deserializer::from_str(text);
        let events = EventArray {
            parsed: &mut parsed,
        }
        .deserialize(&mut de)
        .map_err(|e| ApiError::bad_event(parsed, format!("event {parsed}: invalid JSON: {e}")))?;
        de.end()
            .map_err(|e| ApiError::bad_request(format!("invalid JSON after the array: {e}")))?;
        if events.is_empty() {
            return Err(ApiError::bad_request("empty array: no events"));
        }
        for (i, event) in events.iter().enumerate() {
            if !event.is_object() {
                return Err(ApiError::bad_event(
                    i,
                    format!("event {i}: not a JSON object"),
                ));
            }
        }
        Ok(events)
    } else {
        let event: Value = serde_json::from_str(text)
            .map_err(|e| ApiError::bad_event(0, format!("event 0: invalid JSON: {e}")))?;
        if !event.is_object() {
            return Err(ApiError::bad_event(
                0,
                "event 0: not a JSON object (send an object, an array of objects, or NDJSON)",
            ));
        }
        Ok(vec![event])
    }
}

/// A JSON array read element by element, counting the elements read so far, so that a syntax
/// error names the index of the element it is in.
struct EventArray<'a> {
    parsed: &'a mut usize,
}

impl<'de> DeserializeSeed<'de> for EventArray<'_> {
    type Value = Vec<Value>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Vec<Value>, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for EventArray<'_> {
    type Value = Vec<Value>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of events")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Value>, A::Error> {
        let mut events = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(event) = seq.next_element::<Value>()? {
            events.push(event);
            *self.parsed += 1;
        }
        Ok(events)
    }
}

fn parse_ndjson_events(body: &[u8]) -> Result<Vec<Value>, ApiError> {
    let mut events = Vec::new();
    for (line_no, line) in body.split(|&b| b == b'\n').enumerate() {
        let index = events.len();
        let line = std::str::from_utf8(line).map_err(|_| {
            ApiError::bad_event(
                index,
                format!("event {index} (line {}): not UTF-8", line_no + 1),
            )
        })?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let event: Value = serde_json::from_str(line).map_err(|e| {
            ApiError::bad_event(
                index,
                format!("event {index} (line {}): invalid JSON: {e}", line_no + 1),
            )
        })?;
        if !event.is_object() {
            return Err(ApiError::bad_event(
                index,
                format!("event {index} (line {}): not a JSON object", line_no + 1),
            ));
        }
        events.push(event);
    }
    if events.is_empty() {
        return Err(ApiError::bad_request("empty request body: no events"));
    }
    Ok(events)
}

/// A control object (PUT): JSON (or no `Content-Type`), a JSON object, else 400/415.
pub(crate) fn parse_object(media_type: Option<&str>, body: &[u8]) -> Result<Value, ApiError> {
    match media_type {
        None | Some("application/json") => {}
        Some(other) => return Err(ApiError::UnsupportedMediaType(other.to_string())),
    }
    let body = body.strip_prefix(BOM).unwrap_or(body);
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::bad_request("request body is not UTF-8"))?;
    if text.trim().is_empty() {
        return Err(ApiError::bad_request(
            "empty request body: expected a JSON object",
        ));
    }
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    Ok(value)
}

/// Members CSV (`text/csv`, or no `Content-Type`): the header `namespace,id`, then one
/// `namespace,id` pair per non-empty line. Fields may be double-quoted, with `""` for a quote;
/// unquoted fields are trimmed. Errors name the 1-based line.
pub(crate) fn parse_members_csv(
    media_type: Option<&str>,
    body: &[u8],
) -> Result<Vec<(String, String)>, ApiError> {
    match media_type {
        None | Some("text/csv" | "application/csv") => {}
        Some(other) => return Err(ApiError::UnsupportedMediaType(other.to_string())),
    }
    let body = body.strip_prefix(BOM).unwrap_or(body);
    let text = std::str::from_utf8(body).map_err(|e| {
        let line = 1 + body[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        ApiError::bad_request(format!("line {line}: not UTF-8"))
    })?;
    let mut lines = text.split('\n').enumerate();
    let header = lines.next().map(|(_, l)| l).unwrap_or("");
    let header_fields = csv_fields(header.trim()).ok();
    if header_fields.as_deref() != Some(&["namespace".to_string(), "id".to_string()][..]) {
        return Err(ApiError::bad_request(
            "line 1: the first line must be the header `namespace,id`",
        ));
    }
    let mut members = Vec::new();
    for (i, line) in lines {
        let line_no = i + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let fields =
            csv_fields(line).map_err(|m| ApiError::bad_request(format!("line {line_no}: {m}")))?;
        let [namespace, id]: [String; 2] = fields.try_into().map_err(|f: Vec<String>| {
            ApiError::bad_request(format!(
                "line {line_no}: expected 2 fields (namespace,id), found {}",
                f.len()
            ))
        })?;
        if namespace.is_empty() || id.is_empty() {
            return Err(ApiError::bad_request(format!(
                "line {line_no}: empty namespace or id"
            )));
        }
        members.push((namespace, id));
    }
    Ok(members)
}

/// The fields of one CSV line (no line breaks inside quotes).
fn csv_fields(line: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        // One field.
        while chars.peek().is_some_and(|c| *c == ' ' || *c == '\t') {
            chars.next();
        }
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                    None => return Err("unterminated quoted field".into()),
                }
            }
            while chars.peek().is_some_and(|c| *c == ' ' || *c == '\t') {
                chars.next();
            }
            match chars.peek() {
                None | Some(',') => {}
                Some(_) => return Err("unexpected character after a quoted field".into()),
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                if c == '"' {
                    return Err("a quote inside an unquoted field".into());
                }
                field.push(c);
                chars.next();
            }
            field = field.trim().to_string();
        }
        fields.push(field);
        match chars.next() {
            Some(',') => continue,
            _ => return Ok(fields),
        }
    }
}

/// A path segment as an object id: percent-decoded, 1 to [`MAX_ID_LEN`] bytes of
/// `[A-Za-z0-9._:-]`, else 400.
pub(crate) fn decode_id(segment: &str) -> Result<String, ApiError> {
    let bytes = segment.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| ApiError::bad_request("invalid percent-encoding in the path"))?;
            decoded.push(hex);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    if decoded.is_empty() {
        return Err(ApiError::bad_request("empty id in the path"));
    }
    if decoded.len() > MAX_ID_LEN {
        return Err(ApiError::bad_request(format!(
            "id longer than {MAX_ID_LEN} bytes"
        )));
    }
    if !decoded
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
    {
        return Err(ApiError::bad_request(
            "invalid id: use only letters, digits and . _ : -",
        ));
    }
    // Only ASCII remains.
    String::from_utf8(decoded).map_err(|_| ApiError::bad_request("invalid id"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(r: Result<Vec<Value>, ApiError>) -> Option<usize> {
        match r {
            Err(ApiError::BadRequest { index, .. }) => index,
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn json_events() {
        let one = parse_events(br#"{"a":1}"#, EventsFormat::Json).unwrap();
        assert_eq!(one.len(), 1);
        let many =
            parse_events(b"\xEF\xBB\xBF [{\"a\":1},{\"b\":2}] ", EventsFormat::Json).unwrap();
        assert_eq!(many.len(), 2);
        // A syntax error in element 3 of 5.
        let bad = br#"[{"a":1},{"a":2},{"a":3},{"a":,},{"a":5}]"#;
        assert_eq!(index(parse_events(bad, EventsFormat::Json)), Some(3));
        // A non-object at index 2.
        let bad = br#"[{"a":1},{"a":2},7,{"a":4}]"#;
        assert_eq!(index(parse_events(bad, EventsFormat::Json)), Some(2));
        // Truncated after two elements.
        assert_eq!(
            index(parse_events(br#"[{"a":1},{"a":2},"#, EventsFormat::Json)),
            Some(2)
        );
        assert_eq!(index(parse_events(b"nope", EventsFormat::Json)), Some(0));
        assert_eq!(index(parse_events(b"42", EventsFormat::Json)), Some(0));
        assert_eq!(index(parse_events(b"  ", EventsFormat::Json)), None);
        assert_eq!(index(parse_events(b"[]", EventsFormat::Json)), None);
        assert_eq!(
            index(parse_events(b"{\"a\":\"\xff\"}", EventsFormat::Json)),
            None
        );
        // Trailing garbage after the array: no event to blame.
        assert_eq!(
            index(parse_events(br#"[{"a":1}] x"#, EventsFormat::Json)),
            None
        );
    }

    #[test]
    fn ndjson_events() {
        let ok = parse_events(b"{\"a\":1}\r\n\n  \n{\"b\":2}\n", EventsFormat::Ndjson).unwrap();
        assert_eq!(ok.len(), 2);
        let bad = b"{\"a\":1}\n\n{\"a\":2}\n{oops}\n";
        assert_eq!(index(parse_events(bad, EventsFormat::Ndjson)), Some(2));
        assert_eq!(
            index(parse_events(b"{\"a\":1}\n[1]\n", EventsFormat::Ndjson)),
            Some(1)
        );
        assert_eq!(
            index(parse_events(
                b"{\"a\":1}\n{\"a\":\"\xff\"}\n",
                EventsFormat::Ndjson
            )),
            Some(1)
        );
        assert_eq!(index(parse_events(b"\n\n", EventsFormat::Ndjson)), None);
    }

    #[test]
    fn formats() {
        assert_eq!(EventsFormat::of(None).unwrap(), EventsFormat::Json);
        assert_eq!(
            EventsFormat::of(Some("application/x-ndjson")).unwrap(),
            EventsFormat::Ndjson
        );
        assert!(matches!(
            EventsFormat::of(Some("text/plain")),
            Err(ApiError::UnsupportedMediaType(_))
        ));
    }

    fn csv(text: &str) -> Result<Vec<(String, String)>, ApiError> {
        parse_members_csv(Some("text/csv"), text.as_bytes())
    }

    fn message(r: Result<Vec<(String, String)>, ApiError>) -> String {
        match r {
            Err(ApiError::BadRequest { message, .. }) => message,
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn members_csv() {
        let m = csv(
            "\u{feff}namespace,id\r\nemail, a@x.com \r\n\r\n\"crm\",\"id,with \"\"quotes\"\"\"\n",
        )
        .unwrap();
        assert_eq!(
            m,
            vec![
                ("email".into(), "a@x.com".into()),
                ("crm".into(), "id,with \"quotes\"".into())
            ]
        );
        assert_eq!(csv(" namespace,id \n").unwrap(), vec![]);
        assert!(message(csv("email,a@x.com\n")).starts_with("line 1:"));
        assert!(message(csv("")).starts_with("line 1:"));
        assert!(message(csv("namespace,id,extra\n")).starts_with("line 1:"));
        let m = message(csv("namespace,id\nemail,a\nemail,b,c\n"));
        assert!(m.starts_with("line 3:") && m.contains("found 3"), "{m}");
        assert!(message(csv("namespace,id\nemail\n")).starts_with("line 2:"));
        assert!(message(csv("namespace,id\n\"email,a\n")).starts_with("line 2:"));
        assert!(message(csv("namespace,id\n,a\n")).starts_with("line 2:"));
        assert!(matches!(
            parse_members_csv(Some("application/json"), b"namespace,id\n"),
            Err(ApiError::UnsupportedMediaType(_))
        ));
    }

    #[test]
    fn ids() {
        assert_eq!(decode_id("aud-1.x_y:z").unwrap(), "aud-1.x_y:z");
        assert_eq!(decode_id("a%3Ab").unwrap(), "a:b");
        assert!(decode_id("").is_err());
        assert!(decode_id("a%2Fb").is_err());
        assert!(decode_id("a b").is_err());
        assert!(decode_id("%zz").is_err());
        assert!(decode_id("%e2%82%ac").is_err());
        assert!(decode_id(&"a".repeat(MAX_ID_LEN)).is_ok());
        assert!(decode_id(&"a".repeat(MAX_ID_LEN + 1)).is_err());
    }

    #[test]
    fn objects() {
        assert!(parse_object(None, br#"{"id":"x"}"#).is_ok());
        assert!(parse_object(Some("application/json"), b"[1]").is_err());
        assert!(parse_object(Some("application/json"), b"{").is_err());
        assert!(matches!(
            parse_object(Some("text/plain"), b"{}"),
            Err(ApiError::UnsupportedMediaType(_))
        ));
    }
}
