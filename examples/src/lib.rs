//! Examples live under examples/.
