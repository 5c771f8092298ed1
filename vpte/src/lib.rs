//! DragonFly virtual page table entries and the walker (ABI section 3).
#![forbid(unsafe_code)]
