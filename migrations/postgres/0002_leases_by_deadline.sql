-- Leases by deadline across subscriptions, so that maintenance finds the
-- expired ones with one short index scan however many subscriptions exist
-- (issue 11, item 8). Only leased rows (state 1) are in it; sub_id is
-- there so that the scan need not visit the table.
CREATE INDEX deliveries_leased ON deliveries (available_at, sub_id) WHERE state = 1;
