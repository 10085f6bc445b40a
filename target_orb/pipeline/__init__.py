"""The STATE gate (delivery threads, ordered acknowledgement), dead letters, run statistics."""
