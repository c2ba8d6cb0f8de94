//! The pool's queue of tasks not yet sent to a worker, and cancelling a task
//! that waits in it without a round trip to the supervisor.
//!
//! A caller cancelling a queued task used to ask the supervisor thread and
//! wait for its answer: two thread wake-ups, tens of microseconds, for each
//! of thousands of futures a program cancels after its first failure. The
//! [`CancelBook`] lets the caller decide alone: the supervisor notes in it
//! the highest task id it has taken out of the queue (sent to a worker, or
//! given an outcome), and a task above that mark has not left the queue (or
//! the command channel on its way there). The caller marks such a task
//! cancelled in the book, under the book's lock; the supervisor, taking a
//! task out under the same lock, finds the mark and delivers the cancel
//! instead of sending the task. Anything at or below the mark (a task sent
//! ahead, running, requeued after a crash) is asked of the supervisor as
//! before. The supervisor also takes the new marks in batches, woken once
//! for each, and gives each task its outcome (cancelled) at once rather
//! than when the queue reaches it.
//!
//! A queued task given its outcome early (cancelled) stays in the queue as a
//! tombstone, so that a cancel costs no shift of the tasks behind it; the
//! queue's front is never a tombstone, and tombstones are swept out once
//! they are half of it.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::sync::Mutex;

use crate::error::Error;
use crate::panics::lock;

use super::link::Task;

/// How many tombstones the queue may hold before it is swept, at the least.
const SWEEP_AT: usize = 64;

/// What callers and the supervisor agree on about queued tasks (see the
/// module's doc).
#[derive(Debug, Default)]
pub(crate) struct CancelBook {
    state: Mutex<BookState>,
}

#[derive(Debug, Default)]
struct BookState {
    /// The highest task id the supervisor has taken out of the queue.
    claimed: u64,
    /// Tasks above `claimed` that callers cancelled.
    cancelled: HashSet<u64>,
    /// Tasks above `claimed` cancelled in the queue and gone from it since:
    /// a later cancel of one is answered here (it is cancelled), as it
    /// could not be by the supervisor, which has forgotten it. Dropped as
    /// `claimed` passes them; a cancel of one then asks the supervisor.
    settled: BTreeSet<u64>,
    /// Those of them the supervisor has not looked at yet.
    unseen: Vec<u64>,
    /// The supervisor has finished: nothing is decided here any more.
    closed: bool,
}

impl CancelBook {
    /// Cancels task `id` if the supervisor has not taken it out of the queue
    /// yet; `None` when that cannot be told here (ask the supervisor), else
    /// whether the supervisor is to be woken to look at the new marks (the
    /// first since it last looked).
    /// `submitted` is the next id to be given: ids from it on are no task.
    pub(crate) fn cancel_unclaimed(&self, id: u64, submitted: u64) -> Option<bool> {
        if id >= submitted {
            return None;
        }
        let mut book = lock(&self.state);
        if book.closed || id <= book.claimed {
            return None;
        }
        if book.settled.contains(&id) || !book.cancelled.insert(id) {
            return Some(false);
        }
        book.unseen.push(id);
        Some(book.unseen.len() == 1)
    }

    /// Looks at those of `ids` still marked here again next time.
    fn unseen_again(&self, mut ids: Vec<u64>) {
        let mut book = lock(&self.state);
        ids.retain(|id| book.cancelled.contains(id));
        book.unseen.extend(ids);
    }

    /// The tasks cancelled here since the supervisor last looked.
    pub(crate) fn take_unseen(&self) -> Vec<u64> {
        std::mem::take(&mut lock(&self.state).unseen)
    }

    /// Takes task `id` out of the queue for the supervisor; `false` if a
    /// caller cancelled it first.
    pub(crate) fn claim(&self, id: u64) -> bool {
        let mut book = lock(&self.state);
        book.raise(id);
        !book.cancelled.remove(&id)
    }

    /// Task `id`, cancelled in the queue, leaves it: a caller's mark on it
    /// is spent, and it is settled (see [`BookState::settled`]). The mark
    /// `claimed` stays where it was: tasks below `id` may still wait.
    fn forget(&self, id: u64) {
        let mut book = lock(&self.state);
        book.cancelled.remove(&id);
        if id > book.claimed {
            book.settled.insert(id);
        }
    }

    /// Takes every task in `ids` out of the queue, as [`CancelBook::claim`]
    /// takes each.
    fn claim_all(&self, ids: impl Iterator<Item = u64>) {
        let mut book = lock(&self.state);
        for id in ids {
            book.raise(id);
            book.cancelled.remove(&id);
        }
    }

    /// The supervisor has finished: callers ask it from now on (and learn
    /// that it is gone).
    pub(crate) fn close(&self) {
        lock(&self.state).closed = true;
    }
}

impl BookState {
    /// The supervisor took task `id` out of the queue.
    fn raise(&mut self, id: u64) {
        if id <= self.claimed {
            return;
        }
        self.claimed = id;
        if self.settled.first().is_some_and(|&first| first <= id) {
            self.settled = self.settled.split_off(&(id + 1));
        }
    }
}

/// The tasks waiting for a worker, in the order they are to start.
#[derive(Default)]
pub(crate) struct TaskQueue {
    tasks: VecDeque<Task>,
    /// Tasks in `tasks` already given their outcome (cancelled).
    dead: usize,
}

impl TaskQueue {
    /// Queues a task behind the others.
    pub(crate) fn push_back(&mut self, task: Task) {
        self.tasks.push_back(task);
    }

    /// Puts a task that was sent but not started back in the queue, before
    /// every task that came after it.
    pub(crate) fn requeue(&mut self, task: Task) {
        let at = self.tasks.partition_point(|queued| queued.id < task.id);
        self.tasks.insert(at, task);
    }

    /// How many tasks wait (tombstones aside).
    pub(crate) fn len(&self) -> usize {
        self.tasks.len() - self.dead
    }

    /// Whether no task waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The id of the task that starts next.
    pub(crate) fn front_id(&self) -> Option<u64> {
        self.tasks.front().map(|t| t.id)
    }

    /// Takes the next task to send to a worker, delivering the cancel of
    /// each one a caller cancelled in `book` on the way.
    pub(crate) fn pop_front(&mut self, book: &CancelBook) -> Option<Task> {
        while let Some(mut task) = self.tasks.pop_front() {
            let wanted = book.claim(task.id);
            self.drop_dead_front(book);
            if wanted {
                return Some(task);
            }
            task.deliver(Err(Error::cancelled()));
        }
        None
    }

    /// Gives the tasks callers cancelled in `book` since the last look
    /// their outcome; returns whether there were any.
    pub(crate) fn cancel_marked(&mut self, book: &CancelBook) -> bool {
        let mut coming = book.take_unseen();
        if coming.is_empty() {
            return false;
        }
        // One not queued yet is still in the command channel (submitted
        // from another thread as this one looked): looked at again next time.
        coming.retain(|&id| !self.cancel(id, book));
        if !coming.is_empty() {
            book.unseen_again(coming);
        }
        true
    }

    /// Cancels task `id` if it waits here; returns whether it is cancelled
    /// (now, or before: a task here with its outcome was cancelled).
    pub(crate) fn cancel(&mut self, id: u64, book: &CancelBook) -> bool {
        let found = match self.tasks.binary_search_by_key(&id, |t| t.id) {
            Ok(at) => Some(at),
            // Submitted from several threads, tasks may come a little out of order.
            Err(_) => self.tasks.iter().position(|t| t.id == id),
        };
        let Some(at) = found else { return false };
        let task = &mut self.tasks[at];
        if task.delivered() {
            return true;
        }
        task.deliver(Err(Error::cancelled()));
        self.dead += 1;
        self.drop_dead_front(book);
        if self.dead >= SWEEP_AT && self.dead * 2 >= self.tasks.len() {
            self.tasks.retain(|t| {
                if t.delivered() {
                    book.forget(t.id);
                }
                !t.delivered()
            });
            self.dead = 0;
        }
        true
    }

    /// Takes every waiting task out of the queue (each claimed in `book`).
    pub(crate) fn drain(&mut self, book: &CancelBook) -> impl Iterator<Item = Task> + '_ {
        book.claim_all(self.tasks.iter().map(|t| t.id));
        self.dead = 0;
        self.tasks.drain(..).filter(|t| !t.delivered())
    }

    /// The ids of the waiting tasks, in order.
    #[cfg(test)]
    pub(crate) fn ids(&self) -> Vec<u64> {
        self.tasks.iter().filter(|t| !t.delivered()).map(|t| t.id).collect()
    }

    /// How many tasks the queue has room for.
    pub(crate) fn capacity(&self) -> usize {
        self.tasks.capacity()
    }

    /// Gives back room above `keep` tasks.
    pub(crate) fn shrink_to(&mut self, keep: usize) {
        self.tasks.shrink_to(keep);
    }

    /// Drops the tombstones at the front, whose marks in `book` (a caller
    /// may have cancelled them there too) are spent.
    fn drop_dead_front(&mut self, book: &CancelBook) {
        while let Some(task) = self.tasks.front().filter(|t| t.delivered()) {
            book.forget(task.id);
            self.tasks.pop_front();
            self.dead -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn task(id: u64, outcomes: &Arc<Mutex<Vec<(u64, bool)>>>) -> Task {
        let outcomes = Arc::clone(outcomes);
        Task::new(
            id,
            Vec::new(),
            None,
            None,
            Box::new(move |r| lock(&outcomes).push((id, r.is_err_and(|e| e.is_cancelled())))),
        )
    }

    #[test]
    fn a_task_cancelled_in_the_book_is_never_handed_out_and_is_told_so() {
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let book = CancelBook::default();
        let mut q = TaskQueue::default();
        for id in 1..=4 {
            q.push_back(task(id, &outcomes));
        }
        assert!(book.cancel_unclaimed(2, 5).is_some());
        assert!(book.cancel_unclaimed(3, 5).is_some());
        let first = q.pop_front(&book);
        assert_eq!(first.as_ref().map(|t| t.id), Some(1));
        // 1 is claimed now: at or below the mark, the caller must ask.
        assert!(book.cancel_unclaimed(1, 5).is_none());
        let next = q.pop_front(&book);
        assert_eq!(next.as_ref().map(|t| t.id), Some(4));
        assert_eq!(*lock(&outcomes), vec![(2, true), (3, true)]);
        assert!(q.pop_front(&book).is_none());
        assert!(book.cancel_unclaimed(4, 5).is_none());
        assert!(book.cancel_unclaimed(5, 5).is_none(), "no task 5 was submitted");
    }

    #[test]
    fn a_caller_racing_the_supervisor_never_cancels_a_task_it_handed_out() {
        // Each task is either handed out or cancelled, never both, whoever wins.
        for _ in 0..200 {
            let outcomes = Arc::new(Mutex::new(Vec::new()));
            let book = Arc::new(CancelBook::default());
            let mut q = TaskQueue::default();
            for id in 1..=64 {
                q.push_back(task(id, &outcomes));
            }
            let caller = {
                let book = Arc::clone(&book);
                std::thread::spawn(move || {
                    (1..=64).rev().filter(|&id| book.cancel_unclaimed(id, 65).is_some()).collect::<Vec<u64>>()
                })
            };
            let mut handed_out = Vec::new();
            while let Some(t) = q.pop_front(&book) {
                handed_out.push(t.id);
            }
            let mut mine = caller.join().unwrap_or_default();
            assert!(mine.iter().all(|id| !handed_out.contains(id)), "{mine:?} vs {handed_out:?}");
            assert_eq!(handed_out.len() + mine.len(), 64);
            let mut told: Vec<u64> = lock(&outcomes).iter().filter(|o| o.1).map(|o| o.0).collect();
            mine.sort_unstable();
            told.sort_unstable();
            assert_eq!(told, mine);
        }
    }

    #[test]
    fn a_task_cancelled_twice_is_cancelled_both_times_and_leaves_the_supervisor_nothing_to_look_at() {
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let book = CancelBook::default();
        let mut q = TaskQueue::default();
        for id in 1..=4 {
            q.push_back(task(id, &outcomes));
        }
        assert_eq!(book.cancel_unclaimed(1, 5), Some(true), "the supervisor is woken");
        assert!(q.cancel_marked(&book));
        assert_eq!(q.front_id(), Some(2), "the tombstone left the front");
        assert_eq!(book.cancel_unclaimed(1, 5), Some(false), "cancelled already: nobody to wake");
        assert!(!q.cancel_marked(&book), "nothing is left over for the supervisor");
        // A tombstone in the middle answers for itself.
        assert!(q.cancel(3, &book));
        assert!(q.cancel(3, &book), "cancelled again, it says so");
        assert_eq!(q.len(), 2, "and is counted once");
        assert_eq!(*lock(&outcomes), vec![(1, true), (3, true)]);
        // Once a later task has left the queue, the supervisor is asked.
        assert_eq!(q.pop_front(&book).map(|t| t.id), Some(2));
        assert_eq!(book.cancel_unclaimed(1, 5), None);
        let settled: Vec<u64> = lock(&book.state).settled.iter().copied().collect();
        assert_eq!(settled, [3], "what the mark passed is let go");
    }

    #[test]
    fn cancelled_tasks_leave_tombstones_that_are_swept_and_never_counted() {
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let book = CancelBook::default();
        let mut q = TaskQueue::default();
        for id in 1..=200 {
            q.push_back(task(id, &outcomes));
        }
        for id in (2..=200).step_by(2) {
            assert!(q.cancel(id, &book));
        }
        assert!(!q.cancel(4, &book), "swept: the queue knows it no more");
        assert_eq!(book.cancel_unclaimed(4, 201), Some(false), "the book does: cancelled");
        assert_eq!(q.len(), 100);
        assert!(q.tasks.len() < 200, "swept once half were tombstones");
        assert_eq!(q.ids(), (1..=199).step_by(2).collect::<Vec<_>>());
        // The front is never a tombstone: cancelling it shows the next.
        assert!(q.cancel(1, &book));
        assert_eq!(q.front_id(), Some(3));
        let drained: Vec<u64> = q
            .drain(&book)
            .map(|mut t| {
                t.deliver(Err(Error::closed()));
                t.id
            })
            .collect();
        assert_eq!(drained.len(), 99);
        assert!(q.is_empty());
        assert!(book.cancel_unclaimed(150, 201).is_none(), "drained tasks are claimed");
        assert_eq!(lock(&outcomes).iter().filter(|o| o.1).count(), 101);
    }
}
