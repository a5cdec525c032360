//! What each operation answers, as JSON: the one place that decides the
//! response shapes, used by the HTTP handlers and by the CLI on a data dir
//! (so `--json` prints the same whether it talks to a server or not).

use mediastore::{DurableStore, HoldInfo, MediaRef, MediaStore, Resolved, Result, Timestamp};
use serde_json::{Value, json};

fn rfc3339(t: Timestamp) -> String {
    humantime::format_rfc3339_millis(t.to_system()).to_string()
}

/// Reports and counters are plain structs of numbers and strings.
fn to_json(v: &impl serde::Serialize) -> Value {
    serde_json::to_value(v).expect("reports serialise")
}

/// A ref's description.
pub fn describe(store: &DurableStore, r: &Resolved) -> Value {
    let sha256 = store.digest(r);
    json!({
        "id": r.id.to_string(),
        "uuid": r.id.uuid().to_string(),
        "filename": r.meta.filename,
        "content_type": r.meta.content_type,
        "source": r.meta.source,
        "policy": r.meta.policy.map(|p| p.to_string()),
        "size": store.core().file_size(r.file),
        "managed": sha256.is_some(),
        "sha256": sha256,
        "path": r.path.to_string_lossy(),
        "stored_at": rfc3339(r.stored_at),
    })
}

fn holds_json(holds: &[HoldInfo]) -> Value {
    holds
        .iter()
        .map(|h| {
            json!({
                "scope": h.scope,
                "renewed_at": rfc3339(h.renewed_at),
                "expires_at": h.expires_at.map(rfc3339),
            })
        })
        .collect()
}

/// A ref's description with every scope holding it (`GET /v1/media/{id}`).
pub fn media(store: &DurableStore, id: MediaRef) -> Result<Value> {
    let r = store.core().resolve(id)?;
    let mut v = describe(store, &r);
    v["scopes"] = holds_json(&store.core().holds_of(id)?);
    Ok(v)
}

/// A ref just made or retained under `scope`, with that hold's expiry.
pub fn in_scope(store: &DurableStore, id: MediaRef, scope: &str) -> Result<Value> {
    let r = store.core().resolve(id)?;
    let mut v = describe(store, &r);
    let expires = store
        .core()
        .holds_of(id)?
        .into_iter()
        .find(|h| h.scope == scope)
        .and_then(|h| h.expires_at)
        .map(rfc3339);
    v["scope"] = json!(scope);
    v["expires_at"] = json!(expires);
    Ok(v)
}

/// A scope's refs, oldest hold first.
pub fn scope_refs(store: &DurableStore, scope: &str) -> Result<Value> {
    let refs: Vec<Value> = store
        .core()
        .refs_in(scope)?
        .into_iter()
        .filter_map(|id| store.core().resolve(id).ok())
        .map(|r| describe(store, &r))
        .collect();
    Ok(json!({"scope": scope, "refs": refs}))
}

/// Every scope with holds, and how many.
pub fn scope_list(store: &DurableStore) -> Value {
    let scopes: Vec<Value> = store
        .core()
        .scope_list()
        .into_iter()
        .map(|(scope, holds)| json!({"scope": scope, "holds": holds}))
        .collect();
    json!({ "scopes": scopes })
}

/// Releases a scope; the report.
pub async fn release(store: &DurableStore, scope: &str) -> Result<Value> {
    let mut v = to_json(&store.release_all(scope).await?);
    v["scope"] = json!(scope);
    Ok(v)
}

/// Renews a scope's holds; how many.
pub async fn touch(store: &DurableStore, scope: &str) -> Result<Value> {
    let holds = store.touch(scope).await?;
    Ok(json!({"scope": scope, "holds": holds}))
}

/// Retains a ref into a scope; the ref with that hold's expiry.
pub async fn retain(store: &DurableStore, id: MediaRef, scope: &str) -> Result<Value> {
    store.retain(id, scope).await?;
    in_scope(store, id, scope)
}

/// A sweep's report, as JSON.
pub fn sweep(report: &mediastore::SweepReport) -> Value {
    to_json(report)
}

/// Counters.
pub async fn stats(store: &DurableStore) -> Result<Value> {
    let mut v = to_json(&store.stats().await?);
    v["managed_bytes"] = json!(store.managed_bytes());
    v["index_commits"] = json!(store.journal_stats().commits);
    v["data_dir"] = json!(store.data_dir().to_string_lossy());
    Ok(v)
}
