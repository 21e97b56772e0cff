/**
 * A small unbounded async queue: producers push, one consumer awaits items.
 * Used for the request side of streaming calls and for received deliveries.
 *
 * @internal
 */
export class AsyncQueue<T> {
  private readonly items: T[] = [];
  private readonly waiters: Array<(result: IteratorResult<T> | undefined) => void> = [];
  private ended = false;
  private error: unknown = undefined;

  /** Adds an item; ignored once the queue has ended. */
  push(item: T): void {
    if (this.ended) return;
    const waiter = this.waiters.shift();
    if (waiter) waiter({ value: item, done: false });
    else this.items.push(item);
  }

  /**
   * Ends the queue: consumers get the remaining items, then the end (or
   * `error`, if given, is thrown by {@link next}).
   */
  end(error?: unknown): void {
    if (this.ended) return;
    this.ended = true;
    this.error = error;
    for (const waiter of this.waiters.splice(0)) waiter({ value: undefined, done: true });
  }

  /** Whether {@link end} was called. */
  get isEnded(): boolean {
    return this.ended;
  }

  /** Takes the next item at once if one is queued. */
  tryShift(): T | undefined {
    return this.items.shift();
  }

  /**
   * Waits for the next item. Resolves to `{done: true}` at the end, or to
   * `undefined` when `timeoutMs` passes first; rejects with the end error.
   */
  async next(timeoutMs?: number): Promise<IteratorResult<T> | undefined> {
    if (this.items.length > 0) return { value: this.items.shift() as T, done: false };
    if (this.ended) {
      if (this.error !== undefined) throw this.error;
      return { value: undefined, done: true };
    }
    const result = await new Promise<IteratorResult<T> | undefined>((resolve) => {
      if (timeoutMs === undefined) {
        this.waiters.push(resolve);
        return;
      }
      const waiter = (value: IteratorResult<T> | undefined) => {
        clearTimeout(timer);
        resolve(value);
      };
      const timer = setTimeout(() => {
        const i = this.waiters.indexOf(waiter);
        if (i >= 0) this.waiters.splice(i, 1);
        resolve(undefined);
      }, timeoutMs);
      this.waiters.push(waiter);
    });
    if (result?.done && this.error !== undefined) throw this.error;
    return result;
  }
}

/**
 * A promise with its resolve and reject functions. Marked as handled, so
 * that a caller who ignores it (e.g. a fire-and-forget ack) does not crash
 * the process when it rejects; awaiting it still throws.
 *
 * @internal
 */
export function settleable<T>(): {
  promise: Promise<T>;
  resolve: (value: T) => void;
  reject: (error: unknown) => void;
} {
  let resolve!: (value: T) => void;
  let reject!: (error: unknown) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  promise.catch(() => {});
  return { promise, resolve, reject };
}

/**
 * Marks a promise as handled so that ignoring it does not raise an
 * `unhandledRejection`; awaiting it still throws.
 *
 * @internal
 */
export function handled<T>(promise: Promise<T>): Promise<T> {
  promise.catch(() => {});
  return promise;
}
