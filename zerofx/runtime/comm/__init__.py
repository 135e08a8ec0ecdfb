"""How the runtime's ranks talk: process groups, bootstrap and the collective forms.

    dist        bootstrap from the torchrun environment; "first rank decides" broadcasts
    placement   the runtime's device and process groups (Megatron's rank grid)
    forms       collective forms: one result, several ways to move its bytes, timed once
    form_cache  the forms timed on this host, kept for the next run
    shm         the shared-memory form for ranks on one host
    pending     a started collective's works and what to do once they finish
    log         collective times measured while training, beside the dump's predictions
    error_report  one message per problem on a multi-rank run, printed by one rank
"""
