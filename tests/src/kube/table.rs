//! Server-side printing (`Accept: application/json;as=Table`), which is how
//! `kubectl get` shows a custom resource's printer columns.

use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

use super::patch::get_path;
use super::store::ResourceType;

/// "3s", "5m", "2h", "4d", as kubectl prints ages.
pub fn age(since: &str, now: SystemTime) -> String {
    let Some(then) = parse_time(since) else {
        return "<unknown>".into();
    };
    let secs = now.duration_since(then).unwrap_or(Duration::ZERO).as_secs();
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.frac]Z`.
fn parse_time(text: &str) -> Option<SystemTime> {
    let num = |range: std::ops::Range<usize>| text.get(range)?.parse::<i64>().ok();
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

/// A simple JSONPath (`.a.b.c`) into an object.
fn cell(object: &Value, json_path: &str, type_: &str, now: SystemTime) -> Value {
    let path: Vec<String> = json_path
        .trim_start_matches('.')
        .split('.')
        .map(str::to_string)
        .collect();
    match get_path(object, &path) {
        None | Some(Value::Null) => Value::Null,
        Some(Value::String(s)) if type_ == "date" => json!(age(s, now)),
        Some(value) => value.clone(),
    }
}

/// The Table for `items`: Name, then the kind's printer columns (or Age).
pub fn table(rt: &ResourceType, items: &[Value], rv: u64) -> Value {
    let now = SystemTime::now();
    let age_column =
        json!({"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"});
    let columns: Vec<Value> = if rt.columns.is_empty() {
        vec![age_column]
    } else {
        rt.columns.clone()
    };
    let mut definitions = vec![json!({"name": "Name", "type": "string", "format": "name",
                                      "description": "Name of the object", "priority": 0})];
    for column in &columns {
        definitions.push(json!({
            "name": column["name"], "type": column["type"],
            "format": column.get("format").cloned().unwrap_or(json!("")),
            "description": column.get("description").cloned().unwrap_or(json!("")),
            "priority": column.get("priority").cloned().unwrap_or(json!(0)),
        }));
    }
    let rows: Vec<Value> = items
        .iter()
        .map(|item| {
            let mut cells = vec![item["metadata"]["name"].clone()];
            for column in &columns {
                let path = column["jsonPath"].as_str().unwrap_or_default();
                let type_ = column["type"].as_str().unwrap_or_default();
                cells.push(cell(item, path, type_, now));
            }
            json!({"cells": cells, "object": {"kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1", "metadata": item["metadata"]}})
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1",
           "metadata": {"resourceVersion": rv.to_string()},
           "columnDefinitions": definitions, "rows": rows})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(age("2023-11-14T22:13:15Z", now), "5s");
        assert_eq!(age("2023-11-14T22:03:20Z", now), "10m");
        assert_eq!(age("2023-11-14T19:13:20Z", now), "3h");
        assert_eq!(age("2023-11-10T22:13:20Z", now), "4d");
        assert_eq!(age("garbage", now), "<unknown>");
    }
}
