"""The local stack: moto server on loopback, resources, and helpers to run RunnerHub locally."""
