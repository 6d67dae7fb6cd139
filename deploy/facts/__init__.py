"""Read-only facts about a host: each fact's command (``readonly=True``) next to the parser of what it prints.

Nothing here runs anything: ``execute/`` runs the commands, these modules turn their output into values.
``observe`` gathers every fact a deploy, rollback or restore plan needs in one round trip.
"""
