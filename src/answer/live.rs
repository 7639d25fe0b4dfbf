//! Answers that outlive the page: an answer in a conversation is made and stored whether or not
//! anyone is watching. Its progress (place in line, text so far, the latest rendering, how it
//! ended) is kept here while it runs; any number of streams — the tab that asked, the same tab
//! after a reload, a second tab — follow it from the start, and only `stop` ends it early.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};

use super::StreamEvent;

/// The answers being made in conversations, by conversation.
#[derive(Default)]
pub struct Registry {
    running: Mutex<HashMap<i64, Arc<LiveAnswer>>>,
}

impl Registry {
    /// Records a new answer in `conversation` (an earlier one there, if any, is no longer
    /// followed: the gate lets an account make one answer at a time).
    pub fn begin(&self, conversation: i64, user_id: i64) -> Arc<LiveAnswer> {
        let live = Arc::new(LiveAnswer::new(user_id));
        self.running
            .lock()
            .unwrap()
            .insert(conversation, live.clone());
        live
    }

    /// The answer running in `conversation`, if it belongs to `user_id`.
    pub fn get(&self, conversation: i64, user_id: i64) -> Option<Arc<LiveAnswer>> {
        self.running
            .lock()
            .unwrap()
            .get(&conversation)
            .filter(|l| l.user_id == user_id)
            .cloned()
    }

    /// Forgets `live` once it has ended (its followers still get its end).
    pub fn end(&self, conversation: i64, live: &Arc<LiveAnswer>) {
        let mut running = self.running.lock().unwrap();
        if running
            .get(&conversation)
            .is_some_and(|l| Arc::ptr_eq(l, live))
        {
            running.remove(&conversation);
        }
    }
}

/// One answer's progress so far.
pub struct LiveAnswer {
    user_id: i64,
    state: Mutex<Progress>,
    /// Bumped on every change; followers wait on it.
    changed: watch::Sender<u64>,
    stop: watch::Sender<bool>,
}

#[derive(Default)]
struct Progress {
    queued: Option<(usize, Option<u64>)>,
    /// The answer's pieces as they came (followers get them as they came, not merged).
    pieces: Vec<String>,
    /// The latest rendering (an event), and a number that tells renderings apart.
    html: Option<(u64, StreamEvent)>,
    /// `Done` or `Failed`.
    end: Option<StreamEvent>,
}

impl LiveAnswer {
    fn new(user_id: i64) -> Self {
        Self {
            user_id,
            state: Mutex::default(),
            changed: watch::channel(0).0,
            stop: watch::channel(false).0,
        }
    }

    /// Takes in what the relay has to say.
    pub fn push(&self, event: StreamEvent) {
        {
            let mut p = self.state.lock().unwrap();
            match event {
                StreamEvent::Queued {
                    position,
                    wait_secs,
                } => p.queued = Some((position, wait_secs)),
                StreamEvent::Token { text } => {
                    p.queued = None;
                    p.pieces.push(text);
                }
                // Asked for by API callers only, whose answers are not followed.
                StreamEvent::Logprob(_) | StreamEvent::ToolCall(_) => {}
                html @ StreamEvent::Html { .. } => {
                    let n = p.html.as_ref().map_or(1, |(n, _)| n + 1);
                    p.html = Some((n, html));
                }
                end @ (StreamEvent::Done { .. } | StreamEvent::Failed { .. }) => p.end = Some(end),
            }
        }
        self.changed.send_modify(|v| *v += 1);
    }

    /// Asks the relay to end the answer now (it is kept as `cancelled`).
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Returns once `stop` has been called.
    pub async fn stopped(&self) {
        let mut rx = self.stop.subscribe();
        // The sender lives as long as `self`, so this only returns on a stop.
        let _ = rx.wait_for(|s| *s).await;
    }

    /// A stream of the answer from its start: what has happened so far, then each change as it
    /// comes, then its end. A follower that stops reading holds up only itself.
    pub fn follow(self: Arc<Self>) -> mpsc::Receiver<StreamEvent> {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut changes = self.changed.subscribe();
            let mut seen = Seen::default();
            loop {
                changes.borrow_and_update();
                let (news, ended) = self.news(&mut seen);
                for ev in news {
                    if tx.send(ev).await.is_err() {
                        return;
                    }
                }
                if ended {
                    return;
                }
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        rx
    }

    /// What a follower has not heard yet.
    fn news(&self, seen: &mut Seen) -> (Vec<StreamEvent>, bool) {
        let p = self.state.lock().unwrap();
        let mut out = Vec::new();
        if p.queued != seen.queued {
            seen.queued = p.queued;
            if let Some((position, wait_secs)) = p.queued {
                out.push(StreamEvent::Queued {
                    position,
                    wait_secs,
                });
            }
        }
        for piece in &p.pieces[seen.pieces..] {
            out.push(StreamEvent::Token {
                text: piece.clone(),
            });
        }
        seen.pieces = p.pieces.len();
        if let Some((n, html)) = &p.html {
            if Some(*n) != seen.html {
                seen.html = Some(*n);
                out.push(html.clone());
            }
        }
        match &p.end {
            Some(end) => {
                out.push(end.clone());
                (out, true)
            }
            None => (out, false),
        }
    }
}

/// How far a follower has got.
#[derive(Default)]
struct Seen {
    queued: Option<(usize, Option<u64>)>,
    pieces: usize,
    html: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answer::Finish;
    use crate::engine::Usage;

    fn done() -> StreamEvent {
        StreamEvent::Done {
            message_id: Some(7),
            finish: Finish::Stop,
            usage: Usage::default(),
            html: "<p>ab</p>".into(),
        }
    }

    async fn all(mut rx: mpsc::Receiver<StreamEvent>) -> Vec<StreamEvent> {
        let mut out = Vec::new();
        while let Some(ev) = rx.recv().await {
            out.push(ev);
        }
        out
    }

    #[tokio::test]
    async fn a_late_follower_hears_everything_once_then_the_end() {
        let live = Arc::new(LiveAnswer::new(1));
        live.push(StreamEvent::Queued {
            position: 2,
            wait_secs: None,
        });
        let early = live.clone().follow();
        live.push(StreamEvent::Token { text: "a".into() });
        live.push(StreamEvent::Html {
            html: "<p>a</p>".into(),
            text_len: 1,
        });
        live.push(StreamEvent::Token { text: "b".into() });
        live.push(done());
        let late = live.clone().follow();
        let text = |evs: &[StreamEvent]| -> String {
            evs.iter()
                .filter_map(|e| match e {
                    StreamEvent::Token { text } => Some(text.as_str()),
                    _ => None,
                })
                .collect()
        };
        let (early, late) = (all(early).await, all(late).await);
        assert_eq!(text(&early), "ab");
        assert_eq!(text(&late), "ab");
        assert_eq!(early.last(), Some(&done()));
        assert_eq!(late.last(), Some(&done()));
        // The late one joined after the wait in line: no stale place in it.
        assert!(!late.iter().any(|e| matches!(e, StreamEvent::Queued { .. })));
    }

    #[test]
    fn only_the_owner_finds_a_running_answer_and_ending_forgets_it() {
        let r = Registry::default();
        let live = r.begin(5, 1);
        assert!(r.get(5, 2).is_none());
        assert!(r.get(5, 1).is_some());
        let newer = r.begin(5, 1);
        r.end(5, &live); // the older answer's end does not forget the newer one
        assert!(r.get(5, 1).is_some_and(|l| Arc::ptr_eq(&l, &newer)));
        r.end(5, &newer);
        assert!(r.get(5, 1).is_none());
    }

    #[tokio::test]
    async fn stop_is_heard() {
        let live = LiveAnswer::new(1);
        live.stop();
        live.stopped().await;
    }
}
