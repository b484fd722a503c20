//! Response shaping of one call: `extract` a nested part, keep the first `limit` elements,
//! `select` fields, `rename` fields. Applied in that order.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Shape {
    pub extract: Vec<String>,
    pub limit: Option<usize>,
    pub select: Vec<String>,
    pub rename: BTreeMap<String, String>,
}

impl Shape {
    pub fn is_identity(&self) -> bool {
        self.extract.is_empty()
            && self.limit.is_none()
            && self.select.is_empty()
            && self.rename.is_empty()
    }

    /// Shapes a value; `None` when `extract` names a part the response does not have.
    pub fn apply(&self, mut v: Value) -> Option<Value> {
        for key in &self.extract {
            v = match v {
                Value::Object(mut m) => m.remove(key)?,
                Value::Array(mut a) => {
                    let i: usize = key.parse().ok()?;
                    if i < a.len() {
                        a.swap_remove(i)
                    } else {
                        return None;
                    }
                }
                _ => return None,
            };
        }
        if let (Some(n), Value::Array(a)) = (self.limit, &mut v) {
            a.truncate(n);
        }
        if self.select.is_empty() && self.rename.is_empty() {
            return Some(v);
        }
        Some(match v {
            Value::Array(items) => {
                Value::Array(items.into_iter().map(|i| self.fields(i)).collect())
            }
            other => self.fields(other),
        })
    }

    fn fields(&self, v: Value) -> Value {
        let Value::Object(mut m) = v else {
            return v;
        };
        if !self.select.is_empty() {
            let mut kept = Map::new();
            for f in &self.select {
                if let Some(x) = m.remove(f) {
                    kept.insert(f.clone(), x);
                }
            }
            m = kept;
        }
        for (from, to) in &self.rename {
            if let Some(x) = m.remove(from) {
                m.insert(to.clone(), x);
            }
        }
        Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn extract_limit_select_rename() {
        let shape = Shape {
            extract: vec!["data".into(), "items".into()],
            limit: Some(2),
            select: vec!["id".into(), "total".into()],
            rename: [("total".to_string(), "amount".to_string())].into(),
        };
        let v = json!({"data": {"items": [
            {"id": 1, "total": 5, "secret": "x"},
            {"id": 2, "total": 6},
            {"id": 3, "total": 7}
        ]}});
        assert_eq!(
            shape.apply(v),
            Some(json!([{"id": 1, "amount": 5}, {"id": 2, "amount": 6}]))
        );
        assert_eq!(shape.apply(json!({"data": 1})), None);
        let obj = Shape {
            select: vec!["name".into()],
            ..Shape::default()
        };
        assert_eq!(
            obj.apply(json!({"name": "a", "email": "b"})),
            Some(json!({"name": "a"}))
        );
    }
}
