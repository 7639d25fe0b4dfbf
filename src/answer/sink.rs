//! Where an answer's events go: straight to the one API client that asked, or to the
//! conversation's followers (`live`), however many.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::live::LiveAnswer;
use super::StreamEvent;

/// How long an API client may leave the stream unread before its answer is cut off (and kept).
const CLIENT_STALL: Duration = Duration::from_secs(30);

/// Where an answer's events go.
pub(super) enum Sink {
    /// Straight to the one client that asked (the API): when it leaves, the answer ends.
    Direct(mpsc::Sender<StreamEvent>),
    /// To the conversation's followers, however many (none included).
    Live {
        live: Arc<LiveAnswer>,
        conversation: i64,
    },
}

impl Sink {
    /// Passes `event` on; false when the client has left or stopped reading.
    pub(super) async fn send(&self, event: StreamEvent) -> bool {
        match self {
            Sink::Direct(tx) => matches!(
                tokio::time::timeout(CLIENT_STALL, tx.send(event)).await,
                Ok(Ok(()))
            ),
            Sink::Live { live, .. } => {
                live.push(event);
                true
            }
        }
    }

    /// Returns when the answer is no longer wanted: its client left (direct) or someone
    /// pressed Stop (live).
    pub(super) async fn unwanted(&self) {
        match self {
            Sink::Direct(tx) => tx.closed().await,
            Sink::Live { live, .. } => live.stopped().await,
        }
    }

    /// Followers get the answer rendered as it grows; API clients do not need it.
    pub(super) fn renders(&self) -> bool {
        matches!(self, Sink::Live { .. })
    }
}
