//! Password checks at a bounded cost. An argon2id hash holds 19 MiB while it runs; run on the
//! runtime's blocking pool, a sign-in flood from many addresses grew memory by gigabytes and
//! hundreds of threads. Here a fixed number of threads of their own compute every hash, each in
//! its own 19 MiB allocated once (so memory does not move however many sign-ins arrive), a request waits
//! a short, configured time for one of them, and one client address may have only a few checks
//! running or waiting at once — past either bound the caller is told to come back shortly.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

/// Why a password check did not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Every hashing thread stayed taken for the whole wait, or this client has its share.
    #[error("password checks are busy")]
    Busy,
    /// The hashing threads are gone (the service is stopping).
    #[error("password hashing stopped")]
    Stopped,
}

/// What a hashing thread does.
enum Work {
    Hash(String),
    /// Checks a password against a stored hash; `None`: against a hash of a random password, so
    /// an unknown account costs as much as a known one.
    Verify(String, Option<String>),
}

enum Outcome {
    Hashed(anyhow::Result<String>),
    Verified(bool),
}

struct Job {
    work: Work,
    reply: oneshot::Sender<Outcome>,
    /// One of the `threads` permits: held until the hash is done.
    _permit: OwnedSemaphorePermit,
}

/// Settings (from `[accounts]`).
#[derive(Debug, Clone, Copy)]
pub struct HasherSettings {
    /// Hashing threads; 0 = one per CPU core.
    pub threads: usize,
    pub wait: Duration,
    pub per_client: usize,
}

/// The password hasher (cheap to clone). Its threads end when the last clone is dropped.
#[derive(Clone)]
pub struct Hasher {
    jobs: std::sync::mpsc::SyncSender<Job>,
    free: Arc<Semaphore>,
    wait: Duration,
    /// Checks running or waiting per client address.
    clients: crate::shares::Shares<IpAddr>,
}

impl Hasher {
    pub fn start(settings: HasherSettings) -> anyhow::Result<Self> {
        let threads = match settings.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let (jobs, rx) = std::sync::mpsc::sync_channel::<Job>(threads);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("moss-hash-{i}"))
                .spawn(move || work(&rx))?;
        }
        Ok(Self {
            jobs,
            free: Arc::new(Semaphore::new(threads)),
            wait: settings.wait,
            clients: crate::shares::Shares::new(settings.per_client.max(1)),
        })
    }

    /// Hashes a new password for `client`.
    pub async fn hash(&self, client: IpAddr, password: String) -> Result<String, Refused> {
        match self.run(client, Work::Hash(password)).await? {
            Outcome::Hashed(Ok(h)) => Ok(h),
            Outcome::Hashed(Err(e)) => {
                tracing::error!("hashing a password failed: {e:#}");
                Err(Refused::Stopped)
            }
            Outcome::Verified(_) => Err(Refused::Stopped),
        }
    }

    /// Checks `password` against `hash` (an unknown account: `None`, which costs the same).
    pub async fn verify(
        &self,
        client: IpAddr,
        password: String,
        hash: Option<String>,
    ) -> Result<bool, Refused> {
        match self.run(client, Work::Verify(password, hash)).await? {
            Outcome::Verified(ok) => Ok(ok),
            Outcome::Hashed(_) => Err(Refused::Stopped),
        }
    }

    /// Checks running or waiting for `client` now.
    pub fn in_progress(&self, client: IpAddr) -> usize {
        self.clients.held(client)
    }

    async fn run(&self, client: IpAddr, work: Work) -> Result<Outcome, Refused> {
        let Some(_share) = self.clients.try_take(client) else {
            shed();
            return Err(Refused::Busy);
        };
        let permit = match tokio::time::timeout(self.wait, self.free.clone().acquire_owned()).await
        {
            Ok(Ok(p)) => p,
            Ok(Err(_)) => return Err(Refused::Stopped),
            Err(_) => {
                shed();
                return Err(Refused::Busy);
            }
        };
        let (reply, answer) = oneshot::channel();
        let job = Job {
            work,
            reply,
            _permit: permit,
        };
        // Never blocks: the channel holds as many jobs as there are permits.
        self.jobs.try_send(job).map_err(|_| Refused::Stopped)?;
        answer.await.map_err(|_| Refused::Stopped)
    }
}

/// A hashing thread: its own argon2 memory, reused for every job, until every `Hasher` is gone.
fn work(jobs: &Mutex<std::sync::mpsc::Receiver<Job>>) {
    use crate::secrets::{hash_password_in, verify_password_in};
    let mut scratch = crate::secrets::Scratch::default();
    loop {
        let job = match jobs.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        let outcome = match job.work {
            Work::Hash(p) => Outcome::Hashed(hash_password_in(&mut scratch, &p)),
            Work::Verify(p, Some(h)) => Outcome::Verified(verify_password_in(&mut scratch, &p, &h)),
            Work::Verify(p, None) => {
                // Same cost, and never true.
                let _ = verify_password_in(&mut scratch, &p, dummy_hash());
                Outcome::Verified(false)
            }
        };
        drop(job._permit);
        let _ = job.reply.send(outcome);
    }
}

fn shed() {
    metrics::counter!("moss_shed_total", "reason" => "password_checks").increment(1);
}

/// A valid hash of a random password: unknown accounts are checked against it.
fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| {
        crate::secrets::hash_password(&crate::secrets::token()).expect("argon2 works")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hasher(threads: usize, wait_ms: u64, per_client: usize) -> Hasher {
        Hasher::start(HasherSettings {
            threads,
            wait: Duration::from_millis(wait_ms),
            per_client,
        })
        .unwrap()
    }

    #[tokio::test]
    async fn hashes_verify_and_unknown_accounts_never_match() {
        let h = hasher(1, 10_000, 4);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let stored = h.hash(ip, "a good long password".into()).await.unwrap();
        assert!(h
            .verify(ip, "a good long password".into(), Some(stored.clone()))
            .await
            .unwrap());
        assert!(!h.verify(ip, "wrong".into(), Some(stored)).await.unwrap());
        assert!(!h.verify(ip, "anything".into(), None).await.unwrap());
        assert_eq!(h.in_progress(ip), 0, "shares are given back");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_client_gets_its_share_and_the_rest_are_refused_at_once() {
        // One thread, held here so that no check can finish; a client may have two checks in
        // progress: of six at once from one address, four are refused without waiting.
        let h = hasher(1, 60_000, 2);
        let hold = h.free.clone().acquire_owned().await.unwrap();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..6 {
            let h = h.clone();
            tasks.spawn(async move { h.verify(ip, "pw".into(), None).await });
        }
        for _ in 0..4 {
            assert_eq!(
                tasks.join_next().await.unwrap().unwrap(),
                Err(Refused::Busy)
            );
        }
        assert_eq!(h.in_progress(ip), 2);
        // Another address is not held back by that client's share (it waits for the thread).
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        let h2 = h.clone();
        let other_check = tokio::spawn(async move { h2.verify(other, "pw".into(), None).await });
        drop(hold);
        while let Some(r) = tasks.join_next().await {
            assert_eq!(r.unwrap(), Ok(false));
        }
        assert_eq!(other_check.await.unwrap(), Ok(false));
        assert_eq!(h.in_progress(ip), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_check_that_cannot_get_a_thread_in_time_is_refused() {
        // One thread, held by a first check; the second may wait 1 ms only.
        let h = hasher(1, 1, 8);
        let hold = h.free.clone().acquire_owned().await.unwrap();
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        assert_eq!(
            h.verify(ip, "pw".into(), None).await,
            Err(Refused::Busy),
            "no thread came free within the wait"
        );
        drop(hold);
        assert_eq!(h.verify(ip, "pw".into(), None).await, Ok(false));
    }
}
