//! Fair connection limits: how many connections one peer address may hold, how many of them may
//! be pending (in the TLS handshake, or with no request sent yet), how many the port holds in
//! all, and which connection gives way when a limit is reached.
//!
//! No I/O; `listen` asks [`Table::admit`] at accept and closes what it is told to. The apiserver
//! is a handful of peers, and any pod can reach the admission port (the `NetworkPolicy` cannot
//! name the apiserver's address), so one client must never be able to take every connection.
//! As envoy and nginx limit per downstream address, limits here are per peer; the port's total
//! stays as the memory bound. At a limit the connection that has done the least gives way: one
//! that has sent no request, oldest first (a slowloris or a silent socket), then one idle
//! between requests, of the peer that holds the most. Only when every candidate is busy is the
//! new connection closed instead.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

use super::metrics::{ShedReason, ShedState};

/// The limits of one port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections on the port, in every state: the memory bound.
    pub max: usize,
    /// Open connections of one peer address.
    pub per_peer: usize,
    /// Connections of one peer address in their TLS handshake or with no request sent yet.
    pub pending_per_peer: usize,
}

impl Limits {
    /// Connections that were shed as idle and are still closing (HTTP/2 waits for the client to
    /// acknowledge its GOAWAY, at most [`SHED_GRACE`]): at most an eighth of `max`. Past that an
    /// idle connection is not shed, and the new one is closed instead.
    #[must_use]
    pub fn max_closing(self) -> usize {
        (self.max / 8).max(1)
    }

    /// The most connections the port holds at once, closing ones included: what its memory
    /// bound counts.
    #[must_use]
    pub fn worst_case(self) -> usize {
        self.max.saturating_add(self.max_closing())
    }
}

/// How long a connection shed as idle may take to close gracefully before it is closed outright.
pub const SHED_GRACE: Duration = Duration::from_secs(1);

/// What one connection's requests are doing: how many are in flight, whether any has started,
/// and when the last one ended (milliseconds since the connection began).
#[derive(Debug)]
pub struct Activity {
    pub born: Instant,
    in_flight: AtomicUsize,
    started: AtomicUsize,
    last_end_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            born: Instant::now(),
            in_flight: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
            last_end_ms: AtomicU64::new(0),
        }
    }
}

impl Activity {
    /// Marks a request started; it is in flight until the guard is dropped.
    #[must_use]
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.started.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(self))
    }

    /// Whether a request has been started on this connection.
    #[must_use]
    pub fn has_started(&self) -> bool {
        self.started.load(Ordering::Acquire) > 0
    }

    /// How long the connection has had nothing in flight, if it has nothing in flight now.
    #[must_use]
    pub fn idle_for(&self, now: Instant) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since_born = now.saturating_duration_since(self.born);
        let last = Duration::from_millis(self.last_end_ms.load(Ordering::Acquire));
        Some(since_born.saturating_sub(last))
    }
}

/// Marks one request in flight until dropped.
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let ms = Instant::now()
            .saturating_duration_since(self.0.born)
            .as_millis();
        self.0
            .last_end_ms
            .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How a shed connection is to be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// At once: it has sent no request.
    Now,
    /// Gracefully (HTTP/2 GOAWAY; HTTP/1 after a request being read), within [`SHED_GRACE`].
    Gracefully,
}

const SHED_NOW: u8 = 1;
const SHED_GRACEFULLY: u8 = 2;

/// One connection as its task and the table share it.
#[derive(Debug, Default)]
pub struct Conn {
    pub activity: Arc<Activity>,
    handshaken: AtomicBool,
    shed: Notify,
    how: AtomicU8,
}

impl Conn {
    /// The TLS handshake is done (or there is none): the connection now waits for a request.
    pub fn handshaken(&self) {
        self.handshaken.store(true, Ordering::Release);
    }

    /// Resolves once the connection has been shed, with how to close it. A connection shed as
    /// pending that has started a request since is closed gracefully: its request is answered.
    pub async fn shed(&self) -> Close {
        loop {
            match self.how.load(Ordering::Acquire) {
                SHED_NOW if !self.activity.has_started() => return Close::Now,
                SHED_NOW | SHED_GRACEFULLY => return Close::Gracefully,
                _ => self.shed.notified().await,
            }
        }
    }

    fn signal(&self, how: u8) {
        self.how.store(how, Ordering::Release);
        // A stored permit: the task sees it even if it is not waiting yet.
        self.shed.notify_one();
    }

    fn state(&self) -> ShedState {
        if !self.handshaken.load(Ordering::Acquire) {
            ShedState::Handshake
        } else if self.activity.has_started() {
            ShedState::Idle
        } else {
            ShedState::NoRequest
        }
    }
}

/// A connection that gave way, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shed {
    pub reason: ShedReason,
    pub state: ShedState,
}

struct Entry {
    peer: IpAddr,
    conn: Arc<Conn>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    /// Every open connection that counts against the limits, by id: ids grow, so oldest first.
    conns: BTreeMap<u64, Entry>,
    peers: HashMap<IpAddr, BTreeSet<u64>>,
    /// Connections shed as idle that are still closing.
    closing: usize,
}

/// The connections of one port.
pub struct Table {
    limits: Limits,
    inner: Mutex<Inner>,
    /// Connection tasks alive, shed ones included: what shutdown waits for.
    alive: AtomicUsize,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// A connection's place in the table, held by its task; dropping it frees the place.
pub struct Slot {
    table: Arc<Table>,
    id: u64,
    pub conn: Arc<Conn>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.table.remove(self.id, &self.conn);
        self.table.alive.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What [`Table::admit`] decided about a new connection.
pub struct Admission {
    /// The new connection's place, or `None` when it was refused.
    pub slot: Option<Slot>,
    /// The connections that gave way (already told to close), and the refusal of the new one.
    pub shed: Vec<Shed>,
}

/// A peer is one address, as a pod has one (an IPv6 peer is not widened to its /64); an
/// IPv4-mapped IPv6 address is the IPv4 address.
fn peer_key(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

impl Table {
    #[must_use]
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits: Limits {
                max: limits.max.max(1),
                per_peer: limits.per_peer.max(1),
                pending_per_peer: limits.pending_per_peer.max(1),
            },
            inner: Mutex::new(Inner::default()),
            alive: AtomicUsize::new(0),
        })
    }

    #[must_use]
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Connection tasks still running, shed ones included.
    #[must_use]
    pub fn alive(&self) -> usize {
        self.alive.load(Ordering::Acquire)
    }

    /// Connections counted against the limits now.
    #[must_use]
    pub fn open(&self) -> usize {
        self.lock().conns.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Decides about a new connection from `peer`: makes room by shedding what has done the
    /// least, or refuses it when every candidate is busy.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Admission {
        let peer = peer_key(peer);
        let now = Instant::now();
        let mut inner = self.lock();
        let mut shed = Vec::new();
        let limits = self.limits;

        // 1. One peer's pending connections: its oldest gives way to its newest.
        let pending = inner.pending_of(peer);
        if pending.len() >= limits.pending_per_peer
            && let Some(&victim) = pending.first()
        {
            shed.push(inner.shed_pending(victim, ShedReason::PeerPending));
        }
        // 2. One peer's connections.
        if inner.peers.get(&peer).map_or(0, BTreeSet::len) >= limits.per_peer {
            let victim = inner.pending_of(peer).first().copied();
            match victim {
                Some(v) => shed.push(inner.shed_pending(v, ShedReason::PeerConnections)),
                None => match inner.idlest_of(peer, now, limits) {
                    Some(v) => shed.push(inner.shed_idle(v, ShedReason::PeerConnections)),
                    None => return refuse(shed, ShedReason::PeerConnections),
                },
            }
        }
        // 3. The port's connections: the oldest pending of anyone, else an idle one of the peer
        //    that holds the most.
        if inner.conns.len() >= limits.max {
            let victim = inner
                .conns
                .iter()
                .find(|(_, e)| !e.conn.activity.has_started())
                .map(|(id, _)| *id);
            if let Some(v) = victim {
                shed.push(inner.shed_pending(v, ShedReason::MaxConnections));
            } else {
                let mut peers: Vec<(usize, IpAddr)> = inner
                    .peers
                    .iter()
                    .map(|(ip, ids)| (ids.len(), *ip))
                    .collect();
                peers.sort_unstable_by_key(|(open, _)| std::cmp::Reverse(*open));
                let victim = peers
                    .iter()
                    .find_map(|(_, ip)| inner.idlest_of(*ip, now, limits));
                match victim {
                    Some(v) => shed.push(inner.shed_idle(v, ShedReason::MaxConnections)),
                    None => return refuse(shed, ShedReason::MaxConnections),
                }
            }
        }

        let id = inner.next;
        inner.next += 1;
        let conn = Arc::new(Conn::default());
        inner.conns.insert(
            id,
            Entry {
                peer,
                conn: Arc::clone(&conn),
            },
        );
        inner.peers.entry(peer).or_default().insert(id);
        drop(inner);
        self.alive.fetch_add(1, Ordering::AcqRel);
        Admission {
            slot: Some(Slot {
                table: Arc::clone(self),
                id,
                conn,
            }),
            shed,
        }
    }

    fn remove(&self, id: u64, conn: &Conn) {
        let mut inner = self.lock();
        if conn.how.load(Ordering::Acquire) == SHED_GRACEFULLY {
            inner.closing = inner.closing.saturating_sub(1);
        }
        inner.forget(id);
    }
}

fn refuse(mut shed: Vec<Shed>, reason: ShedReason) -> Admission {
    shed.push(Shed {
        reason,
        state: ShedState::New,
    });
    Admission { slot: None, shed }
}

impl Inner {
    /// The ids of `peer`'s connections that have sent no request, oldest first.
    fn pending_of(&self, peer: IpAddr) -> Vec<u64> {
        let Some(ids) = self.peers.get(&peer) else {
            return Vec::new();
        };
        ids.iter()
            .filter(|id| {
                self.conns
                    .get(id)
                    .is_some_and(|e| !e.conn.activity.has_started())
            })
            .copied()
            .collect()
    }

    /// `peer`'s connection idle the longest, if one is idle and fewer than the limit are closing.
    fn idlest_of(&self, peer: IpAddr, now: Instant, limits: Limits) -> Option<u64> {
        if self.closing >= limits.max_closing() {
            return None;
        }
        self.peers
            .get(&peer)?
            .iter()
            .filter_map(|id| {
                let idle = self.conns.get(id)?.conn.activity.idle_for(now)?;
                Some((idle, *id))
            })
            .max_by_key(|(idle, id)| (*idle, std::cmp::Reverse(*id)))
            .map(|(_, id)| id)
    }

    fn forget(&mut self, id: u64) -> Option<Entry> {
        let entry = self.conns.remove(&id)?;
        if let Some(ids) = self.peers.get_mut(&entry.peer) {
            ids.remove(&id);
            if ids.is_empty() {
                self.peers.remove(&entry.peer);
            }
        }
        Some(entry)
    }

    /// Sheds a connection that has sent no request: closed at once, its place freed now.
    fn shed_pending(&mut self, id: u64, reason: ShedReason) -> Shed {
        let state = match self.forget(id) {
            Some(entry) => {
                let state = entry.conn.state();
                entry.conn.signal(SHED_NOW);
                state
            }
            None => ShedState::NoRequest,
        };
        Shed { reason, state }
    }

    /// Sheds an idle connection: closed gracefully, its place freed now, counted as closing
    /// until its task ends.
    fn shed_idle(&mut self, id: u64, reason: ShedReason) -> Shed {
        if let Some(entry) = self.forget(id) {
            self.closing += 1;
            entry.conn.signal(SHED_GRACEFULLY);
        }
        Shed {
            reason,
            state: ShedState::Idle,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
    const C: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 3));

    fn table(max: usize, per_peer: usize, pending_per_peer: usize) -> Arc<Table> {
        Table::new(Limits {
            max,
            per_peer,
            pending_per_peer,
        })
    }

    fn shed_now(slot: &Slot) -> bool {
        slot.conn.how.load(Ordering::Acquire) == SHED_NOW
    }

    fn shed_gracefully(slot: &Slot) -> bool {
        slot.conn.how.load(Ordering::Acquire) == SHED_GRACEFULLY
    }

    /// A connection that has answered one request and is idle now.
    fn served(slot: &Slot) {
        drop(slot.conn.activity.begin());
    }

    #[test]
    fn a_peer_over_its_pending_limit_loses_its_oldest_pending_connection() {
        let t = table(100, 100, 3);
        let slots: Vec<Slot> = (0..3).map(|_| t.admit(A).slot.unwrap()).collect();
        for s in &slots {
            s.conn.handshaken();
        }
        let fourth = t.admit(A);
        assert!(fourth.slot.is_some());
        assert_eq!(
            fourth.shed,
            vec![Shed {
                reason: ShedReason::PeerPending,
                state: ShedState::NoRequest
            }]
        );
        assert!(shed_now(&slots[0]) && !shed_now(&slots[1]) && !shed_now(&slots[2]));
        assert_eq!(t.open(), 3);
        // Another peer is not touched by A's limit.
        assert!(t.admit(B).shed.is_empty());
    }

    #[test]
    fn a_connection_that_has_sent_a_request_is_not_pending() {
        let t = table(100, 100, 2);
        let busy = t.admit(A).slot.unwrap();
        let request = busy.conn.activity.begin();
        let _a = t.admit(A).slot.unwrap();
        let _b = t.admit(A).slot.unwrap();
        let c = t.admit(A);
        assert_eq!(c.shed.len(), 1);
        assert!(!shed_now(&busy) && !shed_gracefully(&busy));
        drop(request);
    }

    #[test]
    fn at_a_peers_connection_limit_an_idle_one_gives_way_and_busy_ones_never_do() {
        let t = table(100, 2, 10);
        let idle = t.admit(A).slot.unwrap();
        served(&idle);
        let busy = t.admit(A).slot.unwrap();
        let _request = busy.conn.activity.begin();
        let third = t.admit(A);
        assert!(third.slot.is_some());
        assert_eq!(
            third.shed,
            vec![Shed {
                reason: ShedReason::PeerConnections,
                state: ShedState::Idle
            }]
        );
        assert!(shed_gracefully(&idle) && !shed_gracefully(&busy));
        // Now both are busy: the newest is refused.
        let _r = third.slot.as_ref().unwrap().conn.activity.begin();
        let fourth = t.admit(A);
        assert!(fourth.slot.is_none());
        assert_eq!(fourth.shed[0].state, ShedState::New);
    }

    #[test]
    fn at_the_port_limit_the_oldest_pending_of_anyone_then_the_busiest_peers_idle_give_way() {
        let t = table(4, 4, 4);
        let a1 = t.admit(A).slot.unwrap();
        let a2 = t.admit(A).slot.unwrap();
        let a3 = t.admit(A).slot.unwrap();
        let b1 = t.admit(B).slot.unwrap();
        served(&b1);
        // A new peer: the oldest pending connection (A's first) gives way.
        let c1 = t.admit(C);
        assert_eq!(c1.shed[0].reason, ShedReason::MaxConnections);
        assert!(shed_now(&a1));
        let c1 = c1.slot.unwrap();
        served(&a2);
        served(&a3);
        served(&c1);
        // No one is pending: the peer holding the most (A, 2) loses its idlest.
        let c2 = t.admit(C);
        assert!(c2.slot.is_some());
        assert_eq!(c2.shed[0].state, ShedState::Idle);
        assert!(shed_gracefully(&a2) || shed_gracefully(&a3));
        assert!(!shed_gracefully(&b1) && !shed_gracefully(&c1));
    }

    #[test]
    fn idle_connections_still_closing_are_bounded() {
        let t = table(8, 8, 8); // one may be closing at a time
        let slots: Vec<Slot> = (0..8).map(|_| t.admit(A).slot.unwrap()).collect();
        for s in &slots {
            served(s);
        }
        let ninth = t.admit(B).slot.unwrap();
        // The first one shed as idle is still closing: nothing else may be shed, so refused.
        let _request = ninth.conn.activity.begin();
        let tenth = t.admit(B);
        assert!(tenth.slot.is_none());
        // Once it has closed, an idle one may give way again.
        let (gone, kept): (Vec<Slot>, Vec<Slot>) = slots.into_iter().partition(shed_gracefully);
        drop(gone);
        assert!(t.admit(B).slot.is_some());
        drop(kept);
    }

    #[test]
    fn slots_free_their_places_and_shutdown_sees_every_task() {
        let t = table(2, 2, 2);
        let a = t.admit(A).slot.unwrap();
        let b = t.admit(B).slot.unwrap();
        assert_eq!((t.open(), t.alive()), (2, 2));
        // A third, at the limit: the oldest pending (a) gives way but its task is still alive.
        let c = t.admit(C).slot.unwrap();
        assert_eq!((t.open(), t.alive()), (2, 3));
        drop((a, b, c));
        assert_eq!((t.open(), t.alive()), (0, 0));
    }

    #[tokio::test]
    async fn a_pending_connection_that_started_a_request_since_is_closed_gracefully() {
        let t = table(10, 10, 1);
        let first = t.admit(A).slot.unwrap();
        let _second = t.admit(A).slot.unwrap();
        assert_eq!(first.conn.shed().await, Close::Now);
        let _request = first.conn.activity.begin();
        assert_eq!(first.conn.shed().await, Close::Gracefully);
    }

    #[test]
    fn ipv4_mapped_addresses_are_the_same_peer() {
        let t = table(10, 1, 1);
        let _v4 = t.admit(A).slot.unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(t.admit(mapped).shed.len(), 1);
    }
}
