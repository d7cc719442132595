"""Database layer: connection (:mod:`.database`), models (:mod:`.models`), schema migrations (:mod:`.migrate`) and the
result queries the pipeline asks (:mod:`.queries`)."""
