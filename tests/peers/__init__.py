"""Real SIP peers for tests: headless baresip, sipp scenarios, audio fixtures and a test host."""
