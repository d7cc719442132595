"""Database layer: connection (:mod:`.database`), models (:mod:`.models`) and schema migrations (:mod:`.migrate`)."""
