//! Checks of the generated CRD that need no API server: the checked-in YAML is
//! current, the schema is structural, and the subresources, printer columns
//! and validations are the ones the operator relies on.

use lockd_crds::REGENERATE_COMMAND;
use serde_json::{json, Map, Value};

fn crd_json() -> Value {
    serde_json::to_value(lockd_crds::crd()).expect("CRD serializes")
}

fn version(crd: &Value) -> &Value {
    let versions = crd["spec"]["versions"].as_array().expect("versions");
    assert_eq!(versions.len(), 1, "one served version");
    &versions[0]
}

fn schema(crd: &Value) -> &Value {
    &version(crd)["schema"]["openAPIV3Schema"]
}

#[test]
fn checked_in_yaml_is_current() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/lockcluster.yaml");
    let generated = lockd_crds::crd_yaml().expect("CRD renders as YAML");
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "crds/lockcluster.yaml is missing or out of date with the Rust types; regenerate it from the workspace root with:\n\n    {REGENERATE_COMMAND}\n"
    );
}

#[test]
fn yaml_parses_back_to_the_same_crd() {
    let yaml = lockd_crds::crd_yaml().expect("CRD renders as YAML");
    assert!(yaml.ends_with('\n'));
    let parsed: Value = serde_saphyr::from_str(&yaml).expect("generated YAML parses");
    assert_eq!(parsed, crd_json());
}

#[test]
fn names_scope_and_version() {
    let crd = crd_json();
    assert_eq!(crd["apiVersion"], "apiextensions.k8s.io/v1");
    assert_eq!(crd["kind"], "CustomResourceDefinition");
    assert_eq!(crd["metadata"]["name"], "lockclusters.lockd.dev");
    let spec = &crd["spec"];
    assert_eq!(spec["group"], lockd_crds::GROUP);
    assert_eq!(spec["scope"], "Namespaced");
    assert_eq!(spec["names"]["kind"], lockd_crds::KIND);
    assert_eq!(spec["names"]["plural"], lockd_crds::PLURAL);
    assert_eq!(spec["names"]["singular"], "lockcluster");
    assert_eq!(spec["names"]["shortNames"], json!([lockd_crds::SHORT_NAME]));
    assert_eq!(spec["names"]["categories"], json!(["lockd", "all"]));
    let v = version(&crd);
    assert_eq!(v["name"], lockd_crds::VERSION);
    assert_eq!(v["served"], true);
    assert_eq!(v["storage"], true);
}

#[test]
fn status_and_scale_subresources() {
    let crd = crd_json();
    let sub = &version(&crd)["subresources"];
    assert_eq!(sub["status"], json!({}));
    assert_eq!(
        sub["scale"],
        json!({
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        })
    );
    // The scale paths point at fields of the right types.
    let s = schema(&crd);
    assert_eq!(
        s["properties"]["spec"]["properties"]["replicas"]["type"],
        "integer"
    );
    assert_eq!(
        s["properties"]["status"]["properties"]["replicas"]["type"],
        "integer"
    );
    assert_eq!(
        s["properties"]["status"]["properties"]["selector"]["type"],
        "string"
    );
}

#[test]
fn printer_columns() {
    let crd = crd_json();
    let cols = version(&crd)["additionalPrinterColumns"]
        .as_array()
        .expect("printer columns");
    let got: Vec<(&str, &str, &str)> = cols
        .iter()
        .map(|c| {
            (
                c["name"].as_str().expect("name"),
                c["type"].as_str().expect("type"),
                c["jsonPath"].as_str().expect("jsonPath"),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("Replicas", "integer", ".spec.replicas"),
            ("Ready", "integer", ".status.readyReplicas"),
            ("Leader", "string", ".status.leader"),
            ("Version", "string", ".status.currentVersion"),
            ("Phase", "string", ".status.phase"),
            ("Age", "date", ".metadata.creationTimestamp"),
        ]
    );
    // Every column but Age names a field the schema declares.
    let s = schema(&crd);
    for (name, _, path) in &got[..5] {
        let mut node = s;
        for part in path.trim_start_matches('.').split('.') {
            node = &node["properties"][part];
        }
        assert!(
            node.get("type").is_some(),
            "column {name}: {path} not in the schema"
        );
    }
}

#[test]
fn replicas_are_bounded_and_odd() {
    let crd = crd_json();
    let spec = &schema(&crd)["properties"]["spec"];
    let replicas = &spec["properties"]["replicas"];
    assert_eq!(replicas["minimum"].as_f64(), Some(1.0));
    assert_eq!(replicas["maximum"].as_f64(), Some(9.0));
    assert_eq!(lockd_crds::MIN_REPLICAS, 1);
    assert_eq!(lockd_crds::MAX_REPLICAS, 9);
    let required = spec["required"].as_array().expect("required");
    assert!(required.contains(&json!("replicas")) && required.contains(&json!("version")));
    for optional in ["image", "resources", "storage", "lockd", "pod", "service"] {
        assert!(
            !required.contains(&json!(optional)),
            "{optional} must not be required"
        );
    }
    // On the spec object, so it also applies to writes through /scale.
    let rules = spec["x-kubernetes-validations"]
        .as_array()
        .expect("spec rules");
    let odd = rules
        .iter()
        .find(|r| r["rule"] == "self.replicas % 2 == 1")
        .expect("odd replicas rule on spec");
    assert!(odd["message"].as_str().expect("message").contains("odd"));
    assert_eq!(odd["fieldPath"], ".replicas");
}

#[test]
fn defaults_in_the_schema() {
    let crd = crd_json();
    let props = &schema(&crd)["properties"]["spec"]["properties"];
    assert_eq!(props["storage"]["properties"]["size"]["default"], "1Gi");
    assert_eq!(
        props["service"]["properties"]["type"]["default"],
        "ClusterIP"
    );
    assert_eq!(
        props["lockd"]["default"],
        json!({
            "electionTimeoutMs": 1000,
            "heartbeatMs": 100,
            "sessionMinTtlMs": 1000,
            "sessionMaxTtlMs": 300000,
            "snapshotThreshold": 10000,
        })
    );
    assert_eq!(
        props["storage"]["properties"]["retention"]["default"],
        json!({"whenScaled": "Delete", "whenDeleted": "Retain"})
    );
    for (name, p) in props["lockd"]["properties"].as_object().expect("lockd") {
        assert_eq!(p["minimum"].as_f64(), Some(1.0), "lockd.{name} minimum");
    }
}

#[test]
fn cluster_name_rule_matches_the_constant() {
    let crd = crd_json();
    let rules = schema(&crd)["x-kubernetes-validations"]
        .as_array()
        .expect("root rules");
    let limit = format!(
        "self.metadata.name.size() <= {}",
        lockd_crds::MAX_CLUSTER_NAME_LEN
    );
    assert!(
        rules
            .iter()
            .any(|r| r["rule"].as_str().is_some_and(|s| s.contains(&limit))),
        "root rule must limit metadata.name to MAX_CLUSTER_NAME_LEN"
    );
}

/// Kubernetes' structural-schema rules that can be checked offline, plus
/// kube-specific pitfalls. Returns every violation with its path.
fn structural_violations(root: &Value) -> Vec<String> {
    let mut errs = Vec::new();
    let obj = root.as_object().expect("schema is an object");
    if obj.contains_key("additionalProperties") {
        errs.push("(root): additionalProperties is not allowed at the root".into());
    }
    if root["type"] != "object" {
        errs.push("(root): type must be object".into());
    }
    if let Some(meta) = root["properties"].get("metadata") {
        check_root_metadata(meta, &mut errs);
    }
    walk(root, "", &mut errs);
    errs
}

fn check_root_metadata(meta: &Value, errs: &mut Vec<String>) {
    let Some(m) = meta.as_object() else {
        errs.push(".metadata: not an object schema".into());
        return;
    };
    for k in m.keys() {
        if !matches!(k.as_str(), "type" | "properties") {
            errs.push(format!(
                ".metadata: only type and properties allowed, found {k}"
            ));
        }
    }
    if let Some(props) = m.get("properties").and_then(Value::as_object) {
        for (name, p) in props {
            if !matches!(name.as_str(), "name" | "generateName") {
                errs.push(format!(
                    ".metadata.{name}: only name and generateName may be restricted"
                ));
            }
            if p["type"] != "string" {
                errs.push(format!(".metadata.{name}: must be type string"));
            }
        }
    }
}

const FORBIDDEN_ANYWHERE: [&str; 5] = ["$ref", "definitions", "$defs", "$schema", "uniqueItems"];
const LOGIC: [&str; 4] = ["anyOf", "allOf", "oneOf", "not"];

/// A schema node: a property, additionalProperties or items schema, or the root.
fn walk(node: &Value, path: &str, errs: &mut Vec<String>) {
    let here = if path.is_empty() { "(root)" } else { path };
    let Some(obj) = node.as_object() else {
        errs.push(format!("{here}: schema is not an object"));
        return;
    };
    for k in FORBIDDEN_ANYWHERE {
        if obj.contains_key(k) {
            errs.push(format!("{here}: {k} is not allowed"));
        }
    }
    let int_or_string = obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    let preserve = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    let ty = obj.get("type").and_then(Value::as_str);
    if ty.is_none() && !int_or_string && !preserve {
        errs.push(format!("{here}: no type"));
    }
    if int_or_string && ty.is_some() {
        errs.push(format!("{here}: int-or-string must not set type"));
    }
    if obj.get("type").is_some_and(|t| !t.is_string()) {
        errs.push(format!(
            "{here}: type must be a single string, found {}",
            obj["type"]
        ));
    }
    // kube 5 marks every optional int-or-string property nullable
    // (kube_core::schema::OptionalIntOrString); the API server accepts that.
    if obj.contains_key("nullable") && ty.is_none() && !int_or_string {
        errs.push(format!("{here}: nullable without a type"));
    }
    if obj.contains_key("properties") && obj.contains_key("additionalProperties") {
        errs.push(format!("{here}: both properties and additionalProperties"));
    }
    if (obj.contains_key("properties") || obj.contains_key("additionalProperties"))
        && ty != Some("object")
    {
        errs.push(format!("{here}: properties on a non-object"));
    }
    if obj.contains_key("items") != (ty == Some("array")) {
        errs.push(format!("{here}: arrays, and only arrays, must have items"));
    }
    if let Some(e) = obj.get("enum") {
        check_enum(
            e,
            ty,
            obj.get("nullable") == Some(&Value::Bool(true)),
            here,
            errs,
        );
    }
    if let Some(d) = obj.get("default") {
        check_default(d, node, &format!("{here}.default"), errs);
    }
    if let Some(rules) = obj.get("x-kubernetes-validations") {
        check_rules(rules, here, errs);
    }
    check_list_type(obj, here, errs);
    for k in LOGIC {
        if let Some(v) = obj.get(k) {
            let members: Vec<&Value> = match v {
                Value::Array(a) => a.iter().collect(),
                other => vec![other],
            };
            for (i, m) in members.into_iter().enumerate() {
                check_value_validation(m, int_or_string, &format!("{here}.{k}[{i}]"), errs);
            }
        }
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (name, p) in props {
            walk(p, &format!("{path}.{name}"), errs);
        }
        if let Some(req) = obj.get("required").and_then(Value::as_array) {
            for r in req {
                if !r.as_str().is_some_and(|r| props.contains_key(r)) {
                    errs.push(format!("{here}: required {r} is not a property"));
                }
            }
        }
    }
    match obj.get("additionalProperties") {
        Some(Value::Bool(_)) | None => {}
        Some(ap) => walk(ap, &format!("{path}.*"), errs),
    }
    if let Some(items) = obj.get("items") {
        walk(items, &format!("{path}[]"), errs);
    }
}

/// Members of anyOf/allOf/oneOf/not may only validate values: no type,
/// description, default, nullable or additionalProperties (the only
/// exception is int-or-string's `anyOf: [{type: integer}, {type: string}]`).
fn check_value_validation(m: &Value, int_or_string: bool, here: &str, errs: &mut Vec<String>) {
    let Some(o) = m.as_object() else {
        errs.push(format!("{here}: not an object"));
        return;
    };
    for k in [
        "type",
        "description",
        "default",
        "nullable",
        "additionalProperties",
        "title",
    ] {
        if !o.contains_key(k) {
            continue;
        }
        let int_or_string_type = k == "type"
            && int_or_string
            && o.len() == 1
            && matches!(o["type"].as_str(), Some("integer" | "string"));
        if !int_or_string_type {
            errs.push(format!(
                "{here}: {k} is not allowed inside a logical junctor"
            ));
        }
    }
    for k in FORBIDDEN_ANYWHERE {
        if o.contains_key(k) {
            errs.push(format!("{here}: {k} is not allowed"));
        }
    }
    for k in LOGIC {
        if let Some(Value::Array(a)) = o.get(k) {
            for (i, m) in a.iter().enumerate() {
                check_value_validation(m, false, &format!("{here}.{k}[{i}]"), errs);
            }
        }
    }
    if let Some(props) = o.get("properties").and_then(Value::as_object) {
        for (name, p) in props {
            check_value_validation(p, false, &format!("{here}.{name}"), errs);
        }
    }
}

fn check_enum(e: &Value, ty: Option<&str>, nullable: bool, here: &str, errs: &mut Vec<String>) {
    let Some(values) = e.as_array() else {
        errs.push(format!("{here}: enum is not a list"));
        return;
    };
    if values.is_empty() {
        errs.push(format!("{here}: empty enum"));
    }
    for v in values {
        let ok = match (ty, v) {
            (_, Value::Null) => nullable,
            (Some("string"), Value::String(_)) => true,
            (Some("integer"), Value::Number(n)) => n.is_i64() || n.is_u64(),
            _ => false,
        };
        if !ok {
            errs.push(format!("{here}: enum value {v} does not match type {ty:?}"));
        }
    }
}

/// A default must itself be valid and survive pruning: objects only use
/// declared properties (or a declared additionalProperties schema), enums
/// contain the default, scalars have the node's type.
fn check_default(d: &Value, schema: &Value, here: &str, errs: &mut Vec<String>) {
    if schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        if !(d.is_string() || d.is_i64() || d.is_u64()) {
            errs.push(format!("{here}: int-or-string default {d}"));
        }
        return;
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        if !e.contains(d) {
            errs.push(format!("{here}: {d} is not one of the enum values"));
        }
    }
    if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
        if d.as_f64().is_some_and(|v| v < min) {
            errs.push(format!("{here}: {d} is below the minimum {min}"));
        }
    }
    match (schema.get("type").and_then(Value::as_str), d) {
        (Some("object"), Value::Object(m)) => check_object_default(m, schema, here, errs),
        (Some("array"), Value::Array(a)) => {
            for (i, v) in a.iter().enumerate() {
                check_default(v, &schema["items"], &format!("{here}[{i}]"), errs);
            }
        }
        (Some("string"), Value::String(_)) | (Some("boolean"), Value::Bool(_)) => {}
        (Some("integer"), Value::Number(n)) if n.is_i64() || n.is_u64() => {}
        (Some("number"), Value::Number(_)) => {}
        (_, Value::Null) if schema.get("nullable") == Some(&Value::Bool(true)) => {}
        (ty, v) => errs.push(format!("{here}: default {v} does not have type {ty:?}")),
    }
}

fn check_object_default(
    m: &Map<String, Value>,
    schema: &Value,
    here: &str,
    errs: &mut Vec<String>,
) {
    let props = schema.get("properties").and_then(Value::as_object);
    for (k, v) in m {
        match (
            props.and_then(|p| p.get(k)),
            schema.get("additionalProperties"),
        ) {
            (Some(p), _) => check_default(v, p, &format!("{here}.{k}"), errs),
            (None, Some(ap)) if ap.is_object() => {
                check_default(v, ap, &format!("{here}.{k}"), errs)
            }
            _ => errs.push(format!(
                "{here}.{k}: not a declared property (would be pruned)"
            )),
        }
    }
    if let Some(req) = schema.get("required").and_then(Value::as_array) {
        for r in req.iter().filter_map(Value::as_str) {
            let defaulted = props.is_some_and(|p| p[r].get("default").is_some());
            if !m.contains_key(r) && !defaulted {
                errs.push(format!("{here}: lacks required {r}"));
            }
        }
    }
}

fn check_rules(rules: &Value, here: &str, errs: &mut Vec<String>) {
    let Some(rules) = rules.as_array() else {
        errs.push(format!("{here}: x-kubernetes-validations is not a list"));
        return;
    };
    for r in rules {
        let rule = r["rule"].as_str().unwrap_or_default();
        if rule.trim().is_empty() {
            errs.push(format!("{here}: empty CEL rule"));
        }
        let message = r.get("message").and_then(Value::as_str);
        let expr = r.get("messageExpression").and_then(Value::as_str);
        match (message, expr) {
            (Some(m), _) if !m.trim().is_empty() && !m.contains('\n') => {}
            (None, Some(e)) if !e.trim().is_empty() => {}
            _ => errs.push(format!("{here}: CEL rule {rule:?} has no usable message")),
        }
        if let Some(fp) = r.get("fieldPath").and_then(Value::as_str) {
            if !fp.starts_with('.') {
                errs.push(format!("{here}: fieldPath {fp:?} must start with '.'"));
            }
        }
    }
}

/// x-kubernetes-list-type map needs keys that every item has (required or
/// defaulted scalar properties).
fn check_list_type(obj: &Map<String, Value>, here: &str, errs: &mut Vec<String>) {
    let Some(lt) = obj.get("x-kubernetes-list-type").and_then(Value::as_str) else {
        if obj.contains_key("x-kubernetes-list-map-keys") {
            errs.push(format!("{here}: list-map-keys without list-type map"));
        }
        return;
    };
    if obj.get("type").and_then(Value::as_str) != Some("array") {
        errs.push(format!("{here}: list-type on a non-array"));
    }
    if lt != "map" {
        return;
    }
    let items = &obj["items"];
    let keys = obj
        .get("x-kubernetes-list-map-keys")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if keys.is_empty() {
        errs.push(format!("{here}: list-type map without keys"));
    }
    let required = items["required"].as_array().cloned().unwrap_or_default();
    for k in keys.iter().filter_map(Value::as_str) {
        let p = &items["properties"][k];
        if !matches!(p["type"].as_str(), Some("string" | "integer" | "boolean")) {
            errs.push(format!("{here}: map key {k} is not a scalar property"));
        }
        if !required.contains(&json!(k)) && p.get("default").is_none() {
            errs.push(format!(
                "{here}: map key {k} is neither required nor defaulted"
            ));
        }
    }
}

#[test]
fn schema_is_structural() {
    let crd = crd_json();
    let errs = structural_violations(schema(&crd));
    assert!(
        errs.is_empty(),
        "schema is not structural:\n{}",
        errs.join("\n")
    );
}

#[test]
fn structural_checker_catches_violations() {
    let bad = json!({
        "type": "object",
        "properties": {
            "metadata": {"type": "object", "properties": {"labels": {"type": "object"}}},
            "a": {"description": "no type"},
            "b": {"type": "object", "properties": {}, "additionalProperties": {"type": "string"}},
            "c": {"$ref": "#/definitions/C", "type": "string"},
            "d": {"nullable": true},
            "e": {"type": "string", "anyOf": [{"type": "string", "description": "x"}]},
            "f": {"type": "integer", "x-kubernetes-validations": [{"rule": "self > 0"}]},
            "g": {"type": "string", "enum": ["A"], "default": "B"},
            "h": {"type": "object", "properties": {"x": {"type": "string"}}, "default": {"y": "1"}},
        }
    });
    let errs = structural_violations(&bad).join("\n");
    for expected in [
        ".metadata.labels: only name and generateName",
        ".a: no type",
        ".b: both properties and additionalProperties",
        ".c: $ref is not allowed",
        ".d: nullable without a type",
        ".e.anyOf[0]: type is not allowed",
        ".e.anyOf[0]: description is not allowed",
        ".f: CEL rule \"self > 0\" has no usable message",
        ".g.default: \"B\" is not one of the enum values",
        ".h.default.y: not a declared property",
    ] {
        assert!(errs.contains(expected), "missed {expected:?} in:\n{errs}");
    }
}

/// kube-apiserver warns on every apply of a CRD whose schema uses a format
/// it does not know (schemars writes `uint64` for unsigned integers).
#[test]
fn every_format_is_one_the_api_server_knows() {
    fn walk(v: &Value, path: &str, found: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, child) in m {
                    if k == "format" {
                        if let Some(f) = child.as_str() {
                            found.push(format!("{path}: {f}"));
                            assert!(
                                lockd_crds::KNOWN_FORMATS.contains(&f),
                                "{path} has format {f}, which kube-apiserver does not know"
                            );
                        }
                    } else {
                        walk(child, &format!("{path}.{k}"), found);
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|c| walk(c, path, found)),
            _ => {}
        }
    }
    let crd = crd_json();
    let mut found = Vec::new();
    walk(schema(&crd), "", &mut found);
    // The known formats stay: int32/int64 from k8s-openapi's types, and
    // date-time on the conditions' timestamps.
    assert!(found.iter().any(|f| f.ends_with("date-time")), "{found:?}");
    assert!(found.iter().any(|f| f.ends_with("int64")), "{found:?}");
}
