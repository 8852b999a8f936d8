"""The control path: load and placement stores, the rebalance policy, the autoscaler, live migration."""
