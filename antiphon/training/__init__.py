"""Training side: the turn log every coordinator writes, and (later) the actors that learn
policies from it."""
