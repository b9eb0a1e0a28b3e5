use super::*;

fn view(path: &str, rev: u64, data: &str) -> NodeView {
    NodeView {
        path: path.into(),
        data: data.as_bytes().to_vec(),
        version: 1,
        create_revision: rev,
        mod_revision: rev,
        num_children: 0,
        ephemeral_owner: 0,
        container: false,
    }
}

fn put(path: &str, rev: u64) -> Event {
    Event {
        kind: EventKind::Put,
        node: view(path, rev, "v"),
        prev: Some(view(path, rev.saturating_sub(1), "old")),
    }
}

fn del(path: &str, rev: u64) -> Event {
    Event {
        kind: EventKind::Delete,
        node: view(path, rev, ""),
        prev: Some(view(path, rev.saturating_sub(1), "old")),
    }
}

fn hub(max_revisions: u64, buffer: usize) -> Arc<WatchHub> {
    let h = WatchHub::new(WatchConfig {
        max_revisions,
        max_bytes: 1 << 30,
        buffer,
    });
    h.reset_to(0);
    h
}

fn revs(sub: &mut Subscription) -> Vec<u64> {
    let mut out = Vec::new();
    while let Some(i) = sub.try_next() {
        match i {
            Item::Events { revision, .. } => out.push(revision),
            Item::Cancelled(c) => panic!("cancelled: {c:?}"),
        }
    }
    out
}

#[test]
fn replay_then_live_in_order_without_gaps_or_duplicates() {
    let h = hub(100, 1024);
    for r in 1..=10 {
        h.push(r, &[put(&format!("/k{r}"), r)]);
    }
    let mut sub = h
        .subscribe(Filter::new("/", Scope::Subtree), 4)
        .expect("sub");
    for r in 11..=15 {
        h.push(r, &[put(&format!("/k{r}"), r)]);
    }
    assert_eq!(revs(&mut sub), (4..=15).collect::<Vec<_>>());
    h.push(16, &[put("/k16", 16)]);
    assert_eq!(revs(&mut sub), vec![16]);

    // Start 0: only what comes next.
    let mut next = h
        .subscribe(Filter::new("/", Scope::Subtree), 0)
        .expect("sub");
    assert_eq!(next.start_revision(), 17);
    assert!(revs(&mut next).is_empty());
    // A revision without events moves the hub but delivers nothing.
    h.push(17, &[]);
    assert_eq!(h.revision(), 17);
    h.push(18, &[put("/x", 18)]);
    assert_eq!(revs(&mut next), vec![18]);
}

#[test]
fn compaction_boundary() {
    let h = hub(5, 1024);
    for r in 1..=10 {
        if r == 6 {
            h.push(r, &[del("/a", r), put("/b", r)]);
        } else {
            h.push(r, &[put("/a", r)]);
        }
    }
    assert_eq!(h.oldest(), 6);
    let e = h
        .subscribe(Filter::new("/", Scope::Subtree), 5)
        .err()
        .expect("compacted");
    assert_eq!(
        e,
        Compacted {
            requested: 5,
            oldest: 6
        }
    );
    assert!(e.to_string().contains("oldest available revision is 6"));
    let mut sub = h
        .subscribe(Filter::new("/", Scope::Subtree), 6)
        .expect("sub");
    match sub.try_next() {
        Some(Item::Events { revision, events }) => {
            assert_eq!(revision, 6);
            assert_eq!(events.len(), 2);
            assert_eq!(events[0].kind, EventKind::Delete);
            assert_eq!(events[0].prev, None, "prev stripped when not asked for");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(revs(&mut sub), vec![7, 8, 9, 10]);

    // A reset (snapshot) compacts everything up to its revision.
    h.reset_to(20);
    assert_eq!(h.oldest(), 21);
    assert!(h.subscribe(Filter::new("/", Scope::Subtree), 20).is_err());
    assert!(h.subscribe(Filter::new("/", Scope::Subtree), 21).is_ok());
}

#[test]
fn reset_cancels_subscribers_that_miss_revisions() {
    let h = hub(100, 1024);
    h.push(1, &[put("/a", 1)]);
    let mut sub = h
        .subscribe(Filter::new("/", Scope::Subtree), 0)
        .expect("sub");
    h.reset_to(10);
    match sub.try_next() {
        Some(Item::Cancelled(c)) => {
            assert_eq!(c.resume_revision, 2);
            assert!(c.reason.contains("resume from revision 2"), "{}", c.reason);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn filters() {
    let h = hub(100, 1024);
    let sub_of = |f: Filter| h.subscribe(f, 1).expect("sub");
    let mut key = sub_of(Filter::new("/a", Scope::Key));
    let mut subtree = sub_of(Filter::new("/a", Scope::Subtree));
    let mut prefix = sub_of(Filter::new("/a", Scope::Prefix));
    let mut root = sub_of(Filter::new("/", Scope::Subtree));
    let mut no_put = sub_of(Filter {
        no_put: true,
        prev_node: true,
        ..Filter::new("/", Scope::Subtree)
    });
    let mut no_delete = sub_of(Filter {
        no_delete: true,
        ..Filter::new("/", Scope::Subtree)
    });
    h.push(1, &[put("/a", 1)]);
    h.push(2, &[put("/a/b", 2)]);
    h.push(3, &[put("/ab", 3)]);
    h.push(4, &[put("/b", 4)]);
    h.push(5, &[del("/a/b", 5)]);
    assert_eq!(revs(&mut key), vec![1]);
    assert_eq!(revs(&mut subtree), vec![1, 2, 5]);
    assert_eq!(revs(&mut prefix), vec![1, 2, 3, 5]);
    assert_eq!(revs(&mut root), vec![1, 2, 3, 4, 5]);
    assert_eq!(revs(&mut no_delete), vec![1, 2, 3, 4]);
    match no_put.try_next() {
        Some(Item::Events { revision, events }) => {
            assert_eq!(revision, 5);
            assert!(events[0].prev.is_some(), "prev kept when asked for");
        }
        other => panic!("{other:?}"),
    }
    // Only the matching events of a revision are delivered.
    let mut only_b = sub_of(Filter::new("/b", Scope::Key));
    h.push(6, &[put("/a", 6), put("/b", 6)]);
    match only_b.try_next() {
        Some(Item::Events { events, .. }) => assert_eq!(events.len(), 1),
        other => panic!("{other:?}"),
    }
    let mut only_b = sub_of(Filter::new("/b", Scope::Key));
    assert_eq!(revs(&mut only_b), vec![4, 6]);
}

#[test]
fn slow_subscriber_is_cancelled_with_resume_revision() {
    let h = hub(1000, 4);
    let mut slow = h
        .subscribe(Filter::new("/", Scope::Subtree), 0)
        .expect("sub");
    let mut other = h.subscribe(Filter::new("/x", Scope::Key), 0).expect("sub");
    for r in 1..=10 {
        h.push(r, &[put("/k", r)]);
    }
    assert_eq!(
        h.subscribers(),
        1,
        "the slow one is gone, never blocks apply"
    );
    let mut got = Vec::new();
    let cancel = loop {
        match slow.try_next() {
            Some(Item::Events { revision, .. }) => got.push(revision),
            Some(Item::Cancelled(c)) => break c,
            None => panic!("no cancel"),
        }
    };
    assert_eq!(got, vec![1, 2, 3, 4]);
    assert_eq!(cancel.resume_revision, 5);
    assert_eq!(cancel.reason, "watcher fell behind; resume from revision 5");
    assert!(slow.try_next().is_none());
    assert!(revs(&mut other).is_empty());
    // Resuming from the named revision continues the sequence.
    let mut resumed = h
        .subscribe(Filter::new("/", Scope::Subtree), 5)
        .expect("sub");
    assert_eq!(revs(&mut resumed), (5..=10).collect::<Vec<_>>());
}

#[test]
fn byte_limit_compacts() {
    let h = WatchHub::new(WatchConfig {
        max_revisions: 1000,
        max_bytes: 2000,
        buffer: 16,
    });
    for r in 1..=100 {
        h.push(r, &[put("/k", r)]);
    }
    let oldest = h.oldest();
    assert!(oldest > 1 && oldest <= 100, "{oldest}");
    assert!(h
        .subscribe(Filter::new("/", Scope::Subtree), oldest)
        .is_ok());
    assert!(h
        .subscribe(Filter::new("/", Scope::Subtree), oldest - 1)
        .is_err());
}

#[tokio::test]
async fn dropped_subscription_unsubscribes_and_close_cancels() {
    let h = hub(100, 16);
    let sub = h
        .subscribe(Filter::new("/", Scope::Subtree), 0)
        .expect("sub");
    assert_eq!(h.subscribers(), 1);
    drop(sub);
    assert_eq!(h.subscribers(), 0);
    let mut sub = h
        .subscribe(Filter::new("/", Scope::Subtree), 0)
        .expect("sub");
    h.push(1, &[put("/a", 1)]);
    h.close("member shutting down");
    assert!(matches!(
        sub.next().await,
        Some(Item::Events { revision: 1, .. })
    ));
    match sub.next().await {
        Some(Item::Cancelled(c)) => {
            assert_eq!(c.resume_revision, 2);
            assert!(c.reason.starts_with("member shutting down"), "{}", c.reason);
        }
        other => panic!("{other:?}"),
    }
    assert!(sub.next().await.is_none());
}
