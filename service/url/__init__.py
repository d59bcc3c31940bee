"""Images by URL: fetched (:mod:`.fetch`) only from addresses that were checked and pinned
(:mod:`.addresses`)."""
