//! The OpenAPI 3.1 document served at `/openapi.json`. A test checks that
//! it names exactly the routes the router serves, so the two cannot drift.

use serde_json::{Value, json};

fn error_ref() -> Value {
    json!({"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
}

fn ok_json(description: &str, schema: &str) -> Value {
    json!({"description": description,
           "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
}

fn errors(codes: &[(&str, &str)]) -> Vec<(String, Value)> {
    codes
        .iter()
        .map(|(code, why)| {
            let mut v = error_ref();
            v["description"] = json!(why);
            (code.to_string(), v)
        })
        .collect()
}

fn op(
    summary: &str,
    params: &[&str],
    body: Option<Value>,
    ok: (&str, Value),
    errs: &[(&str, &str)],
) -> Value {
    let mut responses = serde_json::Map::new();
    responses.insert(ok.0.to_string(), ok.1);
    for (code, v) in errors(errs) {
        responses.insert(code, v);
    }
    responses.insert("401".into(), {
        let mut v = error_ref();
        v["description"] = json!("missing or wrong bearer token");
        v
    });
    let parameters: Vec<Value> = params.iter().map(|p| param(p)).collect();
    let mut o = json!({"summary": summary, "parameters": parameters, "responses": responses});
    if let Some(b) = body {
        o["requestBody"] = b;
    }
    o
}

fn param(name: &str) -> Value {
    match name {
        "id" => json!({"name": "id", "in": "path", "required": true,
            "description": "The ref: a bare UUID, or the percent-encoded media:// form.",
            "schema": {"type": "string"}}),
        "scope" => json!({"name": "scope", "in": "path", "required": true,
            "description": "The scope name, percent-encoded.", "schema": {"type": "string"}}),
        "scope_q" => {
            json!({"name": "scope", "in": "query", "required": true, "schema": {"type": "string"}})
        }
        "filename_q" => json!({"name": "filename", "in": "query", "required": false,
            "description": "Alternative to X-Media-Filename.", "schema": {"type": "string"}}),
        "source_q" => json!({"name": "source", "in": "query", "required": false,
            "description": "Alternative to X-Media-Source.", "schema": {"type": "string"}}),
        "filename_h" => json!({"name": "X-Media-Filename", "in": "header", "required": false,
            "description": "The original filename (percent-encoded UTF-8); kept as sanitised metadata only.",
            "schema": {"type": "string"}}),
        "source_h" => json!({"name": "X-Media-Source", "in": "header", "required": false,
            "schema": {"type": "string"}}),
        "range" => {
            json!({"name": "Range", "in": "header", "required": false, "schema": {"type": "string"}})
        }
        other => unreachable!("unknown parameter {other}"),
    }
}

/// The document.
pub fn document() -> Value {
    let media = |s: &str| ok_json(s, "Media");
    let bad = ("400", "bad ref, scope, policy or body");
    let unknown = ("404", "unknown ref");
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "mediastore",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Media lifecycle store for AI-agent gateways: opaque media:// refs held by scopes, deleted when nothing needs them.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["code", "message"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
                "Hold": {"type": "object", "properties": {
                    "scope": {"type": "string"}, "renewed_at": {"type": "string", "format": "date-time"},
                    "expires_at": {"type": ["string", "null"], "format": "date-time"}}},
                "Media": {"type": "object", "properties": {
                    "id": {"type": "string", "description": "media://<uuid>"},
                    "uuid": {"type": "string"},
                    "scope": {"type": "string"},
                    "filename": {"type": "string"},
                    "content_type": {"type": "string"},
                    "size": {"type": ["integer", "null"]},
                    "sha256": {"type": ["string", "null"]},
                    "source": {"type": "string"},
                    "policy": {"type": "string", "enum": ["delete_on_cleanup", "forget_only"]},
                    "managed": {"type": "boolean"},
                    "path": {"type": "string"},
                    "stored_at": {"type": "string", "format": "date-time"},
                    "expires_at": {"type": ["string", "null"], "format": "date-time"},
                    "deduplicated": {"type": "boolean"},
                    "scopes": {"type": "array", "items": {"$ref": "#/components/schemas/Hold"}}}},
                "Register": {"type": "object", "required": ["path", "scope"], "properties": {
                    "path": {"type": "string"}, "scope": {"type": "string"},
                    "filename": {"type": "string"}, "content_type": {"type": "string"},
                    "source": {"type": "string"},
                    "policy": {"type": "string", "enum": ["delete_on_cleanup", "forget_only"]}}},
                "ScopeBody": {"type": "object", "required": ["scope"], "properties": {"scope": {"type": "string"}}},
                "Report": {"type": "object", "description": "What a release or sweep did: refs, holds, files and bytes, and failures."},
                "Object": {"type": "object"},
            }
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/media": {"post": op(
                "Upload: the body (raw, or multipart/form-data with a `file` field) is streamed into the managed dir.",
                &["scope_q", "filename_q", "source_q", "filename_h", "source_h"],
                Some(json!({"required": true, "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                    "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}}}})),
                ("201", media("the stored media")),
                &[bad, ("413", "larger than store.max_object_size"), ("507", "a quota is full")])},
            "/v1/media/register": {"post": op(
                "Register an existing file under a configured root.",
                &[],
                Some(json!({"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Register"}}}})),
                ("201", media("the registered media")),
                &[bad, ("403", "outside every configured root, or delete_on_cleanup of a file the store does not own"), ("404", "no such file")])},
            "/v1/media/{id}": {"get": op(
                "A ref's metadata, with the scopes that hold it.",
                &["id"], None, ("200", media("the media")), &[bad, unknown])},
            "/v1/media/{id}/content": {
                "get": op("The bytes: Range, ETag/If-None-Match, safe Content-Disposition.",
                    &["id", "range"], None,
                    ("200", json!({"description": "the bytes", "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}})),
                    &[bad, unknown, ("206", "a range of the bytes"), ("304", "not modified"), ("410", "the file vanished"), ("416", "range not satisfiable")]),
                "head": op("The headers of a download.", &["id", "range"], None,
                    ("200", json!({"description": "headers only"})), &[bad, unknown, ("410", "the file vanished")])},
            "/v1/media/{id}/retain": {"post": op(
                "Add a scope as a holder of the ref (or renew its hold).",
                &["id"],
                Some(json!({"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ScopeBody"}}}})),
                ("200", media("the media, with this hold's expiry")), &[bad, unknown])},
            "/v1/scopes": {"get": op("Every scope with holds, and how many.", &[], None,
                ("200", ok_json("the scopes", "Object")), &[])},
            "/v1/scopes/{scope}": {
                "get": op("The refs a scope holds, oldest hold first.", &["scope"], None,
                    ("200", ok_json("the scope's refs", "Object")), &[bad]),
                "delete": op("Release every hold of the scope; deletes files that lost their last ref.",
                    &["scope"], None, ("200", ok_json("the release report", "Report")), &[bad])},
            "/v1/scopes/{scope}/touch": {"post": op(
                "Renew every hold of the scope.", &["scope"], None,
                ("200", ok_json("how many holds were renewed", "Object")), &[bad])},
            "/v1/gc": {"post": op("Sweep expired holds now.", &[], None,
                ("200", ok_json("the sweep report", "Report")), &[])},
            "/v1/stats": {"get": op("Counters.", &[], None, ("200", ok_json("counters", "Object")), &[])},
            "/healthz": {"get": {"summary": "Liveness (no token needed).", "security": [],
                "responses": {"200": {"description": "alive"}}}},
            "/readyz": {"get": {"summary": "Readiness: the store takes changes (no token needed).", "security": [],
                "responses": {"200": {"description": "ready"}, "503": {"description": "shutting down, or the index cannot be written"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (on server.metrics_listen when set).",
                "responses": {"200": {"description": "text exposition format",
                    "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "This document.",
                "responses": {"200": {"description": "OpenAPI 3.1"}}}},
        }
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    #[test]
    fn the_document_names_exactly_the_served_routes() {
        let doc = super::document();
        let documented: BTreeSet<(String, String)> = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, ops)| {
                ops.as_object()
                    .unwrap()
                    .keys()
                    .map(move |m| (m.clone(), path.clone()))
            })
            .collect();
        let served: BTreeSet<(String, String)> = crate::app::route_table(true)
            .into_iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        assert_eq!(documented, served);
    }
}
