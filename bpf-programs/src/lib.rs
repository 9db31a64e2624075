//! placeholder until its issue fills it
