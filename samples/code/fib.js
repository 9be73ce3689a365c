/**
 * Fibonacci numbers, computed iteratively.
 *
 * Uses BigInt so that large terms stay exact.
 * Run with: node fib.js 20
 */

'use strict';

/**
 * Return the n-th Fibonacci number, with fib(0) = 0 and fib(1) = 1.
 * @param {number} n a non-negative integer
 * @returns {bigint}
 */
function fib(n) {
  if (!Number.isInteger(n) || n < 0) {
    throw new RangeError('n must be a non-negative integer');
  }
  let a = 0n;
  let b = 1n;
  for (let i = 0; i < n; i++) {
    [a, b] = [b, a + b];
  }
  return a;
}

/** Return the first `count` Fibonacci numbers as an array. */
function fibSequence(count) {
  return Array.from({ length: count }, (_, i) => fib(i));
}

module.exports = { fib, fibSequence };

if (require.main === module) {
  const n = Number(process.argv[2] ?? 10);
  console.log(`fib(${n}) = ${fib(n)}`);
  console.log(fibSequence(10).join(', '));
}
