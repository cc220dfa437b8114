"""Predictive scaling, offline half: traces, their generator, the forecaster and the simulator.

scikit-learn and numpy are imported here only (forecast/model.py, forecast/generate.py and the
simulator), never by app.py, chalicelib/ or executor/: the webhook's path stays light. This
package file imports nothing heavy; import the module you need (docs/scaling.md).
"""
