"""The servers beside the coordinator: the log server and the dashboard.

Long-running processes that only speak AMQP, started as `vespid logserver` and
`vespid dashboard`. They use the client library; the client library never imports them.
"""
