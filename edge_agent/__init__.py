"""Edge agent: config, poll scheduler, publisher, store-and-forward spool, device health."""
