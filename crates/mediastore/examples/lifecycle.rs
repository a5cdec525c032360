//! One media lifecycle, step by step, on the embedded default engine
//! (`DurableStore`): a photo arrives in a chat message, the agent resolves
//! it, the session keeps it, the gateway restarts, the message is done, and
//! the photo expires when the session goes quiet.
//!
//! Run with `cargo run -p mediastore --example lifecycle`.

use std::time::Duration;

use mediastore::{
    Clock, DurableStore, DurableStoreBuilder, Expiry, ManualClock, MediaMeta, MediaStore,
    SystemClock,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tokio::runtime::Builder::new_current_thread()
        .build()?
        .block_on(run())
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    // The gateway's download directory: files here belong to the store.
    let downloads = tempfile::tempdir()?;
    let photo = downloads.path().join("AgACAgIAAxk.jpg");
    std::fs::write(&photo, b"\xff\xd8\xff\xe0 a tiny jpeg")?;

    // The store's data dir (index and managed files); a temp dir here,
    // `./mediastore-data` by default.
    let data = tempfile::tempdir()?;
    // A clock we can move, so the example does not have to wait 7 days.
    let clock = ManualClock::new(SystemClock.now());
    let config = || -> DurableStoreBuilder {
        DurableStore::builder(data.path())
            .owned_root(downloads.path())
            .max_age(Duration::from_secs(30 * 60))
            .scope_rule("session:", Expiry::After(Duration::from_secs(7 * 86400)))
            .clock(clock.clone())
    };
    let store = config().open()?;
    println!("store: data dir {}", data.path().display());
    println!("       owned root {}", downloads.path().display());
    println!("       default max age 30m, session:* scopes 7d");

    let message = "telegram:123:456";
    let session = "session:123";
    let meta = MediaMeta::new("cat.jpg", "image/jpeg", "telegram");
    let r = store.store(&photo, &meta, message).await?;
    let resolved = store.resolve_with_meta(r).await?;
    println!("\n1. store    {} under {message}", photo.display());
    println!(
        "   → {r} (policy {}, by location)",
        resolved.meta.policy.expect("set")
    );

    println!("\n2. resolve  {r}");
    println!(
        "   → {} ({}, {}, from {})",
        resolved.path.display(),
        resolved.meta.filename,
        resolved.meta.content_type,
        resolved.meta.source
    );

    store.retain(r, session).await?;
    println!("\n3. retain   {r} into {session}");
    println!("   → held by {:?}", store.scopes_of(r).await?);

    drop(store);
    let store = config().open()?;
    let restored = store.open_report();
    println!("\n4. restart  (the gateway was redeployed)");
    println!(
        "   → restored {} ref(s) and {} hold(s) in {} ms; {r} is held by {:?}",
        restored.refs,
        restored.holds,
        restored.took_ms,
        store.scopes_of(r).await?
    );

    let report = store.release_all(message).await?;
    println!("\n5. release  {message}");
    println!(
        "   → released {} ref(s), removed {}, deleted {} file(s); the file is still there: {}",
        report.refs_released,
        report.refs_removed,
        report.files_deleted,
        photo.exists()
    );

    clock.advance(Duration::from_secs(3 * 86400));
    let report = store.clean_expired().await?;
    println!("\n6. 3 days later, sweep");
    println!(
        "   → expired {} ref(s); the session still holds it: {}",
        report.refs_expired,
        store.resolve(r).await.is_ok()
    );

    clock.advance(Duration::from_secs(5 * 86400));
    let report = store.clean_expired().await?;
    println!("\n7. 8 days after the last use, sweep");
    println!(
        "   → expired {} ref(s), deleted {} file(s), freed {} bytes; file exists: {}",
        report.refs_expired,
        report.files_deleted,
        report.bytes_freed,
        photo.exists()
    );
    match store.resolve(r).await {
        Err(e) => println!("   → resolve now fails: {e}"),
        Ok(p) => return Err(format!("ref should be gone, resolves to {}", p.display()).into()),
    }
    Ok(())
}
