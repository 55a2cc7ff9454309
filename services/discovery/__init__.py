"""Discovery: the node's Nostr identity, its kind-38421 announcement, and the other nodes it sees on the relays."""
