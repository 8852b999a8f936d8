"""moeyard.cluster: everything that needs Ray, Redis or pydantic (config, infra, control, serving,
CLI, dashboard, k8s)."""
