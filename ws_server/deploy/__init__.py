"""Running several nodes: the load balancer's config and a whole cluster on one machine."""
