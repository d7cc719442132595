"""Versioned schema migrations of the plugin's tables (installed as ``astra_thepayne.migrations``).

Each module ``mNNNN_<what>.py`` defines ``upgrade(database, migrator)``; :mod:`astra_thepayne.db.migrate` applies the
ones not yet recorded in the ``thepayne_migration`` table, in order, each in its own transaction. Migrations are
frozen: once released, a migration never changes; a schema change is a new module.
"""
