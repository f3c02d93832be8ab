//! Reads what `doctor` checks from the live cluster. (Being written.)
