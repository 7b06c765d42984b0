//! The way in: every publish becomes a [`Job`](job::Job) for the one committer task, which stores
//! a group of them with one history write and fans them out (`commit`); in cluster mode the
//! committer appends to the shared log and the `follower` fans out what it reads back. Above
//! `fanout`, below the hub.

mod commit;
mod follower;
mod idempotency;
mod job;

pub(crate) use commit::commit_loop;
pub(crate) use follower::{Feed, follow};
pub(crate) use idempotency::{KeyBounds, Keys};
pub(crate) use job::Job;
pub use job::{PublishError, Published};
