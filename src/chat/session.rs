//! The task that owns one chat: it numbers events, hands them to the `intermediate` store
//! (one save in flight per chat; the store slot batches saves across chats), publishes them
//! and acknowledges senders only after the save succeeded, and asks the save-error policy
//! what to do when a save fails.

use super::event::now_ms;
use super::sent::SentIds;
use super::{ChatError, ChatHandle, ChatMap, ChatShared, Command, Deps, Event, Joined, Kind, Member, Meta, OlderEvents, Participant, Role, Roster};
use crate::auth;
use crate::kpi::Opened;
use crate::plugins::bindings::notices::{Notice, NoticeKind};
use crate::plugins::bindings::policy::{Decision, ErrorKind, SaveFailure};
use crate::plugins::bindings::store::ClaimOutcome;
use crate::plugins::bindings::types::{ChatDelta, ChatState, Transcript};
use crate::plugins::slots::StorageError;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

/// Who is waiting for an event to be saved.
enum Ack {
    Seq(oneshot::Sender<Result<u64, ChatError>>),
    Joined(oneshot::Sender<Result<Joined, ChatError>>, Joined),
    Created(oneshot::Sender<Result<(), ChatError>>),
}

impl Ack {
    fn send(self, result: Result<u64, ChatError>) {
        match self {
            Ack::Seq(tx) => drop(tx.send(result)),
            Ack::Joined(tx, joined) => drop(tx.send(result.map(|_| joined))),
            Ack::Created(tx) => drop(tx.send(result.map(drop))),
        }
    }
}

struct Pending {
    event: Arc<Event>,
    acks: Vec<Ack>,
}

struct Session {
    deps: Arc<Deps>,
    map: ChatMap,
    shared: Arc<ChatShared>,
    epoch: u64,
    state: ChatState,
    meta: Meta,
    next_seq: u64,
    /// Events numbered but not yet saved, oldest first; invisible to readers.
    unsaved: Vec<Pending>,
    /// How many of `unsaved` the save in flight carries.
    in_flight: usize,
    saving: Option<oneshot::Receiver<Result<(), StorageError>>>,
    meta_dirty: bool,
    /// Whether the save in flight carries the metadata (to resend it if that save fails).
    meta_in_flight: bool,
    /// (participant, client_msg_id) -> seq, saved or pending: resends get the original seq.
    sent: SentIds,
    must_reconnect: Vec<Arc<str>>,
    attempt: u32,
    last_good_save: Instant,
    retry_at: Option<tokio::time::Instant>,
    /// Events were refused after a save that may have landed, and their seqs go to new events:
    /// those are saved at the next epoch, claimed first, so a store that orders a seq's writes
    /// by epoch (Cassandra) keeps the new ones.
    next_epoch_due: bool,
    /// Closers waiting for the final transcript to be stored.
    closing: Vec<oneshot::Sender<Result<u64, ChatError>>>,
    ended: bool,
    /// Another instance restored this chat and this one keeps a read-only copy
    /// (`restore.purge_old_owner = false`): every write is refused.
    fenced: bool,
    /// Per participant: message tokens left and when they were counted (rate limit).
    buckets: HashMap<Arc<str>, (f64, Instant)>,
    /// This chat no longer counts in `sessions_current` (it may end by more than one path:
    /// closed by the policy, then dropped when the lease lapsed).
    counted_out: bool,
}

/// Starts a new chat's task; the returned receiver resolves when its first save is done.
pub(super) fn open(deps: Arc<Deps>, map: ChatMap, chat_id: Arc<str>, meta: Meta) -> (ChatHandle, oneshot::Receiver<Result<(), ChatError>>) {
    let customer = meta.participants[0].clone();
    let mut session = Session::new(deps, map, chat_id, 1, ChatState::Waiting, meta, Vec::new(), Vec::new());
    session.deps.kpi.chat_opened(Opened::Created);
    let (tx, rx) = oneshot::channel();
    session.append(Kind::Joined, &customer.id, &customer.nickname, String::new(), None, Some(Ack::Created(tx)));
    (session.spawn(), rx)
}

/// Serves a closed chat's stored transcript read-only.
pub(super) fn read_only(deps: Arc<Deps>, map: ChatMap, t: Transcript) -> Result<ChatHandle, ChatError> {
    let meta = parse_meta(&t.meta)?;
    let events: Vec<Arc<Event>> = t.events.into_iter().map(Event::from_wit).collect();
    let mut session = Session::new(deps, map, t.chat_id.into(), t.epoch, ChatState::Closed, meta, events, Vec::new());
    // Never counted in sessions_current: nothing to take out when it goes.
    session.counted_out = true;
    Ok(session.spawn())
}

/// Continues a stored chat this instance has just claimed at `epoch` (the store refuses the
/// old owner's writes from now on): its numbering goes on, participants present before get
/// `reconnected` when they come back, and everyone learns where the chat lives now.
/// `how`: restored, or taken back (this instance dropped it for a lapsed lease).
pub(super) fn restore(deps: Arc<Deps>, map: ChatMap, t: Transcript, epoch: u64, previous_owner: &str, how: Opened) -> Result<ChatHandle, ChatError> {
    let meta = parse_meta(&t.meta)?;
    let events: Vec<Arc<Event>> = t.events.into_iter().map(Event::from_wit).collect();
    let returning: Vec<Arc<str>> = meta.participants.iter().filter(|p| p.present).map(|p| p.id.clone()).collect();
    let mut session = Session::new(deps, map, t.chat_id.into(), epoch, t.state, meta, events, returning);
    session.deps.kpi.chat_opened(how);
    info!(event_id = "chat.restored", chat_id = %session.shared.id, epoch, previous_owner, taken_back = how == Opened::TakenBack, "chat restored from storage");
    if previous_owner != &*session.deps.instance_id {
        let here = session.deps.instance_id.to_string();
        session.append(Kind::Moved, &"".into(), &"".into(), here.clone(), None, None);
        // The reference's "location changed" for outside systems (e.g. a webhook).
        session.raise(NoticeKind::ChatMoved, None, here);
    }
    Ok(session.spawn())
}

fn parse_meta(meta: &str) -> Result<Meta, ChatError> {
    serde_json::from_str(meta).map_err(|e| ChatError::Storage(format!("stored chat metadata is unreadable: {e}")))
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    fn new(deps: Arc<Deps>, map: ChatMap, id: Arc<str>, epoch: u64, state: ChatState, meta: Meta, events: Vec<Arc<Event>>, must_reconnect: Vec<Arc<str>>) -> Self {
        let next_seq = events.last().map_or(1, |e| e.seq + 1);
        let mut sent = SentIds::default();
        for e in &events {
            if let Some(id) = &e.client_msg_id {
                sent.insert(&e.participant_id, id, e.seq);
            }
        }
        let placeholder = Roster { state, subject: String::new(), customer_nickname: "".into(), created_ms: 0, members: Vec::new() };
        let shared = ChatShared::new(id, meta.opening(), placeholder, events, OlderEvents::of(&deps));
        let s = Session {
            deps,
            map,
            shared,
            epoch,
            state,
            meta,
            next_seq,
            unsaved: Vec::new(),
            in_flight: 0,
            saving: None,
            // A new chat's first save writes its row; a restored chat's row is already stored.
            meta_dirty: epoch == 1,
            meta_in_flight: false,
            sent,
            must_reconnect,
            attempt: 0,
            last_good_save: Instant::now(),
            retry_at: None,
            next_epoch_due: false,
            closing: Vec::new(),
            ended: false,
            fenced: false,
            buckets: HashMap::new(),
            counted_out: false,
        };
        s.shared.set_roster(s.roster());
        s
    }

    fn spawn(self) -> ChatHandle {
        let (tx, rx) = mpsc::channel(256);
        let handle = ChatHandle { shared: self.shared.clone(), commands: tx };
        tokio::spawn(self.run(rx));
        handle
    }

    fn roster(&self) -> Roster {
        let customer_nickname = self.meta.participants.iter().find(|p| p.role == Role::Customer).map_or_else(|| "".into(), |p| p.nickname.clone());
        Roster {
            state: self.state,
            subject: self.meta.subject.clone(),
            customer_nickname,
            created_ms: self.meta.created_ms,
            members: self
                .meta
                .participants
                .iter()
                .map(|p| Member {
                    id: p.id.clone(),
                    role: p.role,
                    nickname: p.nickname.clone(),
                    token_sha256: p.token_sha256,
                    present: p.present,
                    must_reconnect: self.must_reconnect.contains(&p.id),
                })
                .collect(),
        }
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        loop {
            let retry_at = self.retry_at;
            // A closed chat with nothing left to save stays a while for late readers, then ends.
            let lingering = (self.fenced || self.state == ChatState::Closed) && self.unsaved.is_empty() && self.closing.is_empty();
            tokio::select! {
                command = commands.recv() => match command {
                    Some(c) => self.handle(c),
                    None => break,
                },
                saved = async { self.saving.as_mut().expect("guarded").await }, if self.saving.is_some() => {
                    self.saving = None;
                    let result = saved.unwrap_or_else(|_| Err(crate::plugins::PluginFault::Gone.into()));
                    self.on_saved(result).await;
                }
                _ = async { tokio::time::sleep_until(retry_at.expect("guarded")).await }, if retry_at.is_some() => {
                    self.retry_at = None;
                    if self.next_epoch_due {
                        self.claim_next_epoch().await;
                    }
                    self.start_save();
                }
                _ = tokio::time::sleep(self.deps.linger), if lingering => break,
            }
            if self.ended {
                break;
            }
        }
        // Only this task's own entry: after a lapse the chat may have been restored here anew.
        let mut map = self.map.write().unwrap();
        if map.get(&self.shared.id).is_some_and(|h| Arc::ptr_eq(&h.shared, &self.shared)) {
            map.remove(&self.shared.id);
        }
    }

    fn handle(&mut self, command: Command) {
        let open = self.state != ChatState::Closed;
        if self.fenced {
            return match command {
                Command::Post { reply, .. } | Command::Leave { reply, .. } | Command::Close { reply, .. } => drop(reply.send(Err(ChatError::Moved))),
                Command::Join { reply, .. } => drop(reply.send(Err(ChatError::Moved))),
                Command::Opened { reply } => drop(reply.send(Err(ChatError::Moved))),
                Command::Reconnect { .. } | Command::Abandon => {}
            };
        }
        match command {
            Command::Post { member, text, client_msg_id, reply } => {
                if let Some(id) = &client_msg_id
                    && let Some(seq) = self.sent_seq(&member, id)
                {
                    return self.ack_duplicate(seq, reply);
                }
                if !open {
                    return drop(reply.send(Err(ChatError::Closed)));
                }
                if let Err(limited) = self.take_message_token(&member) {
                    return drop(reply.send(Err(limited)));
                }
                let nickname = self.nickname(&member);
                if let Some(id) = &client_msg_id {
                    // The seq `append` gives it.
                    self.sent.insert(&member, id, self.next_seq);
                }
                self.append(Kind::Message, &member, &nickname, text, client_msg_id, Some(Ack::Seq(reply)));
            }
            Command::Opened { reply } => {
                let customer = self.meta.participants.iter().find(|p| p.role == Role::Customer).map(|p| p.id.clone());
                match self.unsaved.iter_mut().find(|u| u.event.kind == Kind::Joined && Some(&u.event.participant_id) == customer.as_ref()) {
                    Some(pending) => pending.acks.push(Ack::Created(reply)),
                    None => drop(reply.send(Ok(()))),
                }
            }
            Command::Join { nickname, client_request_id, reply } => {
                let (id, token) = match &client_request_id {
                    None => (auth::new_id(), auth::new_token().0),
                    Some(request) => {
                        let key = self.deps.cluster.secret().as_bytes();
                        let id = auth::derive(key, &["agent", &self.shared.id, request]);
                        let token = auth::derive(key, &["agent-token", &self.shared.id, &id, request]);
                        (id, token)
                    }
                };
                if client_request_id.is_some()
                    && let Some(p) = self.meta.participants.iter().find(|p| *p.id == *id)
                {
                    // A retried join: the same answer, no one added — once the first join is
                    // saved, as a resent message is acknowledged only once it is saved.
                    if p.nickname != nickname {
                        return drop(reply.send(Err(ChatError::RequestReused("client_request_id was used for another join".into()))));
                    }
                    let joined = Joined { participant_id: p.id.clone(), token };
                    return match self.unsaved.iter_mut().find(|u| u.event.kind == Kind::Joined && u.event.participant_id == joined.participant_id) {
                        Some(pending) => pending.acks.push(Ack::Joined(reply, joined)),
                        None => drop(reply.send(Ok(joined))),
                    };
                }
                if !open {
                    return drop(reply.send(Err(ChatError::Closed)));
                }
                if self.meta.participants.len() >= self.deps.max_participants {
                    return drop(reply.send(Err(ChatError::Full(self.deps.max_participants))));
                }
                let token_sha256 = auth::hash(&token);
                let agent = Participant { id: id.into(), role: Role::Agent, nickname: nickname.clone(), token_sha256, present: true };
                let joined = Joined { participant_id: agent.id.clone(), token };
                self.meta.participants.push(agent.clone());
                self.state = ChatState::Active;
                self.meta_dirty = true;
                self.shared.set_roster(self.roster());
                self.append(Kind::Joined, &agent.id, &nickname, String::new(), None, Some(Ack::Joined(reply, joined)));
            }
            Command::Reconnect { member } => {
                if let Some(i) = self.must_reconnect.iter().position(|m| *m == member) {
                    self.must_reconnect.swap_remove(i);
                    self.shared.set_roster(self.roster());
                    if open {
                        let nickname = self.nickname(&member);
                        self.append(Kind::Reconnected, &member, &nickname, String::new(), None, None);
                    }
                }
            }
            Command::Leave { member, reply } => {
                if !open {
                    return drop(reply.send(Err(ChatError::Closed)));
                }
                let nickname = self.nickname(&member);
                if let Some(p) = self.meta.participants.iter_mut().find(|p| p.id == member) {
                    p.present = false;
                }
                self.meta_dirty = true;
                self.shared.set_roster(self.roster());
                self.append(Kind::Left, &member, &nickname, String::new(), None, Some(Ack::Seq(reply)));
                if !self.meta.participants.iter().any(|p| p.present) {
                    self.begin_close("everyone left".into(), None);
                }
            }
            Command::Close { reason, reply } => {
                if !open {
                    return drop(reply.send(Ok(self.shared.last_seq())));
                }
                self.begin_close(reason, Some(reply));
            }
            Command::Abandon => {
                // Whatever was in flight may or may not be stored: its senders get no ack
                // and resend with their client_msg_id to the new owner, which knows the seq.
                self.unsaved.clear();
                for closer in self.closing.drain(..) {
                    let _ = closer.send(Err(ChatError::Moved));
                }
                self.count_end(false);
                self.deps.kpi.chats_purged.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.shared.moved.send_replace(true);
                self.ended = true;
            }
        }
    }

    /// The seq `member` got for `id`, if the message was sent (saved or pending).
    fn sent_seq(&self, member: &str, id: &str) -> Option<u64> {
        let sent_as = |e: &Event| &*e.participant_id == member && e.client_msg_id.as_deref() == Some(id);
        let find = || self.shared.find_event(sent_as).or_else(|| self.unsaved.iter().find(|p| sent_as(&p.event)).map(|p| p.event.seq));
        self.sent.seq(member, id, |seq| self.event_is(seq, sent_as), find)
    }

    /// Whether the event with this seq, saved or pending, passes `test`; None when it is no
    /// longer in memory.
    fn event_is(&self, seq: u64, test: impl Fn(&Event) -> bool) -> Option<bool> {
        match self.unsaved.first().map(|p| p.event.seq) {
            Some(first) if seq >= first => Some(self.unsaved.get((seq - first) as usize).is_some_and(|p| test(&p.event))),
            _ => self.shared.event_is(seq, test),
        }
    }

    fn ack_duplicate(&mut self, seq: u64, reply: oneshot::Sender<Result<u64, ChatError>>) {
        match self.unsaved.iter_mut().find(|p| p.event.seq == seq) {
            Some(pending) => pending.acks.push(Ack::Seq(reply)),
            None => drop(reply.send(Ok(seq))),
        }
    }

    fn nickname(&self, member: &str) -> Arc<str> {
        self.meta.participants.iter().find(|p| &*p.id == member).map_or_else(|| "".into(), |p| p.nickname.clone())
    }

    /// Takes this chat out of `sessions_current`, once.
    fn count_end(&mut self, closed: bool) {
        if !std::mem::replace(&mut self.counted_out, true) {
            self.deps.kpi.chat_ended(closed);
        }
    }

    /// The rate limit (a token bucket per participant); resends of a message already taken
    /// never get here, so a client retrying after a failover is not charged twice.
    fn take_message_token(&mut self, member: &Arc<str>) -> Result<(), ChatError> {
        let Some((per_second, burst)) = self.deps.message_rate else { return Ok(()) };
        let now = Instant::now();
        let (tokens, at) = self.buckets.entry(member.clone()).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * per_second).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(ChatError::RateLimited { per_second, retry_ms: ((1.0 - *tokens) / per_second * 1000.0).ceil() as u64 })
        }
    }

    /// Numbers a new transcript event and starts saving it.
    fn append(&mut self, kind: Kind, member: &Arc<str>, nickname: &Arc<str>, text: String, client_msg_id: Option<String>, ack: Option<Ack>) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let event = Event::new(seq, kind, member.clone(), nickname.clone(), text, client_msg_id, now_ms());
        self.unsaved.push(Pending { event, acks: ack.into_iter().collect() });
        self.start_save();
        seq
    }

    fn begin_close(&mut self, reason: String, reply: Option<oneshot::Sender<Result<u64, ChatError>>>) {
        self.state = ChatState::Closed;
        self.meta_dirty = true;
        self.shared.set_roster(self.roster());
        self.closing.extend(reply);
        self.append(Kind::Closed, &"".into(), &"".into(), reason, None, None);
    }

    fn start_save(&mut self) {
        if self.saving.is_some() || self.retry_at.is_some() || self.unsaved.is_empty() {
            return;
        }
        if self.next_epoch_due {
            // Claimed first, on this task's loop (see `claim_next_epoch`).
            self.retry_at = Some(tokio::time::Instant::now());
            return;
        }
        if self.deps.auto_save == 0 {
            // No intermediate saves: events are visible and acknowledged at once.
            self.in_flight = self.unsaved.len();
            let (tx, rx) = oneshot::channel();
            let _ = tx.send(Ok(()));
            self.saving = Some(rx);
            return;
        }
        self.in_flight = self.unsaved.len();
        self.meta_in_flight = std::mem::take(&mut self.meta_dirty);
        let delta = ChatDelta {
            chat_id: self.shared.id.to_string(),
            epoch: self.epoch,
            owner: self.deps.instance_id.to_string(),
            state: self.state,
            meta: self.meta_in_flight.then(|| serde_json::to_string(&self.meta).expect("meta serializes")),
            events: self.unsaved.iter().map(|p| p.event.to_wit()).collect(),
        };
        self.saving = Some(self.deps.intermediate.submit_save(delta));
    }

    async fn on_saved(&mut self, result: Result<(), StorageError>) {
        match result {
            Ok(()) if self.shared.has_moved() => {
                // Dropped while this save was under way (the lease lapsed and `abandon_all` ran;
                // the Abandon command is still queued): another instance may have restored the
                // chat before the write arrived. As with Abandon, what was in flight gets no ack;
                // its senders resend with their client_msg_id to whoever has the chat.
                self.in_flight = 0;
                self.unsaved.clear();
            }
            Ok(()) => {
                self.attempt = 0;
                self.last_good_save = Instant::now();
                let saved: Vec<Pending> = self.unsaved.drain(..self.in_flight).collect();
                self.in_flight = 0;
                let messages = saved.iter().filter(|p| p.event.kind == Kind::Message).count();
                self.deps.kpi.messages_saved.fetch_add(messages as u64, std::sync::atomic::Ordering::Relaxed);
                if self.epoch == 1 && saved.first().is_some_and(|p| p.event.seq == 1) {
                    // The customer's `joined`, the chat's first event: its creation is saved.
                    self.deps.kpi.chat_created();
                    info!(event_id = "chat.created", chat_id = %self.shared.id, sessions_current = self.deps.kpi.sessions_current.load(std::sync::atomic::Ordering::Relaxed), "chat created");
                }
                self.shared.publish(saved.iter().map(|p| p.event.clone()));
                for p in saved {
                    for ack in p.acks {
                        ack.send(Ok(p.event.seq));
                    }
                }
                if self.deps.auto_save == 2 {
                    self.raise(NoticeKind::TranscriptSaved, None, String::new());
                }
                self.start_save();
                if self.unsaved.is_empty() && !self.closing.is_empty() {
                    self.finish_close().await;
                }
            }
            Err(e) => self.on_save_failed(e).await,
        }
    }

    async fn on_save_failed(&mut self, e: StorageError) {
        self.in_flight = 0;
        self.meta_dirty |= self.meta_in_flight;
        self.deps.kpi.save_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if e.kind == ErrorKind::StaleEpoch {
            self.lost_to_another(&e);
            return;
        }
        self.attempt += 1;
        let failure = SaveFailure {
            chat_id: self.shared.id.to_string(),
            attempt: self.attempt,
            error_kind: e.kind,
            message: e.message.clone(),
            ms_since_last_save: self.last_good_save.elapsed().as_millis() as u64,
            pending_messages: self.unsaved.iter().filter(|p| p.event.kind == Kind::Message).count() as u32,
        };
        warn!(event_id = "chat.save_failed", chat_id = %self.shared.id, attempt = self.attempt, cause = %e, "saving the transcript failed");
        match self.deps.policy.decide(failure).await {
            Decision::Retry(delay_ms) => {
                self.retry_at = Some(tokio::time::Instant::now() + Duration::from_millis(delay_ms.into()));
            }
            Decision::Continue(reason) => {
                self.raise(NoticeKind::SaveFailed, None, reason.clone());
                self.fail_unsaved(ChatError::NotSaved(reason));
                // Claimed before the next save (see `next_epoch_due`).
                self.next_epoch_due = !self.ended;
            }
            Decision::Close(reason) => {
                error!(event_id = "chat.closed_on_error", chat_id = %self.shared.id, cause = %e, "closing the chat: its transcript cannot be saved");
                self.raise(NoticeKind::ChatClosed, None, reason.clone());
                self.fail_unsaved(ChatError::NotSaved(reason.clone()));
                // As in the reference: closed without a final save. The `closed` event cannot
                // be stored; it is published here so every reader on this instance learns it.
                self.state = ChatState::Closed;
                self.shared.set_roster(self.roster());
                let seq = self.next_seq;
                self.next_seq += 1;
                self.shared.publish([Event::new(seq, Kind::Closed, "".into(), "".into(), reason, None, now_ms())]);
                for closer in self.closing.drain(..) {
                    let _ = closer.send(Err(ChatError::Closed));
                }
                self.count_end(true);
            }
        }
    }

    /// Another instance restored this chat (or may have: this instance's lease is not live).
    /// It is theirs now, and our unsaved events never were.
    fn lost_to_another(&mut self, e: &StorageError) {
        self.fail_unsaved(ChatError::Moved);
        // Its creation itself was refused (the same keyed chat created on another instance
        // first): it never existed here, so there is nothing to purge.
        let never_existed = self.meta.participants.is_empty();
        self.count_end(false);
        self.shared.moved.send_replace(true);
        if self.deps.purge_old_owner {
            if !never_existed {
                warn!(event_id = "chat.purged", chat_id = %self.shared.id, epoch = self.epoch, cause = %e, "save refused: another instance owns this chat; dropping it");
                self.deps.kpi.chats_purged.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            self.ended = true;
        } else {
            warn!(event_id = "chat.fenced", chat_id = %self.shared.id, epoch = self.epoch, cause = %e, "save refused: another instance owns this chat; keeping a read-only copy");
            self.fenced = true;
        }
    }

    /// Claims this chat's next epoch from this instance itself (see `next_epoch_due`), when
    /// there is something to save. A claim the store does not answer is a failed save of the
    /// waiting events: the policy decides, as for any save.
    async fn claim_next_epoch(&mut self) {
        let claimed = self.deps.intermediate.claim(&self.shared.id, &self.deps.instance_id, self.epoch).await;
        match claimed {
            Ok(ClaimOutcome::Claimed(epoch)) => {
                info!(event_id = "chat.epoch_advanced", chat_id = %self.shared.id, epoch, "refused events may have landed: their seqs are saved anew at the next epoch");
                self.epoch = epoch;
                self.next_epoch_due = false;
            }
            Ok(ClaimOutcome::EpochMoved(_) | ClaimOutcome::OwnerAlive(_)) => {
                let message = format!("chat {} has moved past epoch {} of this instance", self.shared.id, self.epoch);
                self.next_epoch_due = false;
                self.lost_to_another(&StorageError { kind: ErrorKind::StaleEpoch, message });
            }
            Err(e) => self.on_save_failed(e).await,
        }
    }

    /// Drops every unsaved event and tells whoever waits for them; their numbers are reused,
    /// so the transcript stays dense and no reader ever saw them. A failed save may still have
    /// landed: the store keeps the later event of a seq (the `save` contract in the WIT).
    fn fail_unsaved(&mut self, why: ChatError) {
        if let Some(first) = self.unsaved.first() {
            self.next_seq = first.event.seq;
        }
        for p in self.unsaved.drain(..) {
            if let Some(id) = &p.event.client_msg_id {
                self.sent.remove(&p.event.participant_id, id, p.event.seq);
            }
            if p.event.kind == Kind::Joined {
                self.meta.participants.retain(|m| m.id != p.event.participant_id);
            }
            for ack in p.acks {
                ack.send(Err(why.clone()));
            }
        }
        if self.meta.participants.is_empty() {
            // The chat's creation itself was not saved: it never existed.
            self.ended = true;
            self.count_end(false);
        }
        if self.state == ChatState::Closed && !self.ended {
            // The `closed` event was among the dropped ones: the chat stays open.
            let agent_here = self.meta.participants.iter().any(|p| p.role == Role::Agent && p.present);
            self.state = if agent_here { ChatState::Active } else { ChatState::Waiting };
            for closer in self.closing.drain(..) {
                let _ = closer.send(Err(why.clone()));
            }
        }
        self.meta_dirty = true;
        self.shared.set_roster(self.roster());
    }

    /// Stores the final transcript, then drops the intermediate one.
    async fn finish_close(&mut self) {
        let mut transcript = Transcript {
            chat_id: self.shared.id.to_string(),
            epoch: self.epoch,
            state: ChatState::Closed,
            meta: serde_json::to_string(&self.meta).expect("meta serializes"),
            events: Vec::new(),
        };
        let mut result = Err(ChatError::Closed);
        for attempt in 1..=3 {
            // The events older than the window are read back from the intermediate store.
            let saved = match self.shared.events_after(0, usize::MAX, None).await {
                Ok(events) => {
                    transcript.events = events.iter().map(|e| e.to_wit()).collect();
                    self.deps.final_store.save_final(transcript.clone()).await.map_err(|e| e.message)
                }
                Err(e) => Err(e.to_string()),
            };
            match saved {
                Ok(()) => {
                    result = Ok(self.shared.last_seq());
                    break;
                }
                Err(e) => {
                    error!(event_id = "chat.final_save_failed", chat_id = %self.shared.id, attempt, cause = %e, "saving the final transcript failed");
                    result = Err(ChatError::NotSaved(e));
                    tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                }
            }
        }
        if result.is_ok()
            && self.deps.auto_save > 0
            && self.deps.purge_on_close
            && let Err(e) = self.deps.intermediate.purge(&self.shared.id).await
        {
            warn!(event_id = "chat.purge_failed", chat_id = %self.shared.id, cause = %e, "the intermediate transcript stays until its TTL");
        }
        self.count_end(true);
        let reason = self.shared.last_of(Kind::Closed).map(|e| e.text.clone()).unwrap_or_default();
        self.raise(NoticeKind::ChatClosed, None, reason);
        info!(event_id = "chat.deleted", chat_id = %self.shared.id, sessions_current = self.deps.kpi.sessions_current.load(std::sync::atomic::Ordering::Relaxed), "chat closed");
        for closer in self.closing.drain(..) {
            let _ = closer.send(result.clone());
        }
    }

    fn raise(&self, kind: NoticeKind, participant_id: Option<String>, detail: String) {
        let notice = Notice { chat_id: self.shared.id.to_string(), kind, participant_id, detail };
        self.deps.notices.raise(notice, self.shared.clone());
    }
}
