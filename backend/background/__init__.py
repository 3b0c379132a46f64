"""Work that outlives a request: webhook notices, settings confirmations, the pre-labeling queue; the reference rules."""
