//! Listing, removing and collecting garbage in a repository (format-spec §9.7).
