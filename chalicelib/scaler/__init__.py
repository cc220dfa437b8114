"""The scaler: per pool, desired capacity from heartbeats and demand, and idle hosts retired
without ever killing a busy runner (docs/scaling.md).

`decision` is the pure decision (frozen dataclasses out); `service.Scaler` acts on it under a
per-pool lease (`store`), through the Auto Scaling API (`autoscaling`) and the retire protocol;
`handler` is the Lambda entry (schedule and jobs-table stream) and its wiring; `settings` its
configuration; `__main__` the command line (`python -m chalicelib.scaler`).
"""
