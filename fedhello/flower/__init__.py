"""fedhello on Flower: the same rounds as the in-process engine, with clients behind Flower's
Message API (ServerApp + ClientApp).

The ServerApp runs `run_federation`, the loop the in-process engine runs, with one difference:
a round's clients train on SuperNodes. Each sampled client gets its own message (its layer set
or rank, and the adapters it needs) and replies with only the tensors it trained. Allocation,
local training and aggregation are the same functions as in-process, so one seed gives the
same adapters and metrics on both engines.

Clients are the data partitions: a SuperNode says which partition it holds (`partition-id` in
its node config) when asked once by a query message; Flower's node ids, random per run, are
only used to address messages.

    fedhello run ... engine=flower                        # simulation engine, this machine
    flwr run . NAME --run-config "config-path='/abs/cfg.yaml' out-dir='/abs/run'"  # deployment

The modules:

    server_app.py   the ServerApp: partition discovery, a round as messages (FlowerTrainer)
    client_app.py   the ClientApp: answers partition queries, trains the client a message names
    run_config.py   the run-config keys both apps read, and the experiment config they name
    simulation.py   `engine: flower`: both apps on Flower's simulation engine
    wire.py         the message codec both sides use (named keys, packed tensors)
    identity.py     partitions bound to the SuperNode keys the operator registered
    warm.py         a drop-in `flower-superexec` that forks ClientApps from a preloaded process

Nothing is imported here, so that a ClientApp process loads the client side only.
"""
