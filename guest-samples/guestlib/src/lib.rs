//! What the sample guests under `guest-samples/` share, written once: guest
//! RAM mapped as the direct map ([`dmap`]), page-table helpers over it
//! ([`tables`]), errno text ([`errno`]), the start of a test guest's `main`
//! ([`start`]), and a vmspace the guest
//! owns ([`vmspace`]).
//!
//! The raw hypercalls stay in `vkabi::hypercall`; this crate builds on them.
//! Its one `unsafe` step of its own is the RAM mapping in [`dmap`].

pub mod dmap;
pub mod errno;
pub mod start;
pub mod tables;
pub mod vmspace;

pub use dmap::map_ram;
pub use errno::{errno_text, must, strerror};
pub use start::{start, vk_info};
pub use vmspace::{HypercallError, Vmspace};
