-- Rows that may be in progress out of their key's turn on an ordered
-- subscription (issue 16, item 3): a redriven dead letter (its key's later
-- messages went ahead when it died), and the rows of a subscription whose
-- ordering was switched off (its held messages were let go). Every other
-- in-progress row of a key is the key's head or held behind it, so the
-- check that a due row has no earlier message of its key in progress needs
-- to look at these rows only. It looks through this index, which holds
-- them alone: the index of all rows by key also holds the dead entries of
-- every message acked since the last VACUUM, and walking those made each
-- lease cost more the more messages had been consumed.
ALTER TABLE deliveries ADD COLUMN out_of_turn BOOLEAN NOT NULL DEFAULT false;
CREATE INDEX deliveries_out_of_turn ON deliveries (sub_id, key, seq) WHERE out_of_turn;
-- Rows already out of turn: a key's in-progress, not held rows (9223372036854775807
-- is `HELD`) that have a later one of the same key, which the old check
-- held back behind them.
UPDATE deliveries d SET out_of_turn = true
 WHERE d.key IS NOT NULL AND d.state IN (0, 1) AND d.available_at <> 9223372036854775807
   AND EXISTS (SELECT 1 FROM deliveries l WHERE l.sub_id = d.sub_id AND l.key = d.key
     AND l.seq > d.seq AND l.state IN (0, 1) AND l.available_at <> 9223372036854775807);
