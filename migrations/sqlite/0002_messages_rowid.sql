-- Messages move to a rowid table.
--
-- As a WITHOUT ROWID table (a B-tree keyed by its primary key) `messages`
-- kept at most about a quarter of a page (some 1000 bytes of 4 KiB) of a row
-- in the B-tree and spilled the rest into an overflow page of its own: a
-- 1 KiB payload took an overflow page per message, about 4.6 times its size
-- on disk. A rowid table keeps rows of up to a page's size in its leaf
-- pages. (topic_id, seq) becomes a unique index, and rows are still
-- appended at the right edge of both B-trees. The payload comes last, so
-- that reading a row's times never walks a large payload's overflow pages.
CREATE TABLE messages_v2 (
    topic_id     INTEGER NOT NULL,
    seq          INTEGER NOT NULL,
    id           BLOB    NOT NULL,
    key          TEXT,
    attributes   BLOB,
    created_at   INTEGER,
    published_at INTEGER NOT NULL,
    payload      BLOB    NOT NULL
);

INSERT INTO messages_v2 (topic_id, seq, id, key, attributes, created_at, published_at, payload)
SELECT topic_id, seq, id, key, attributes, created_at, published_at, payload
FROM messages ORDER BY topic_id, seq;

DROP TABLE messages;
ALTER TABLE messages_v2 RENAME TO messages;
CREATE UNIQUE INDEX messages_by_seq ON messages (topic_id, seq);
